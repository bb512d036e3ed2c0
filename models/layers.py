"""Layers shared by the models."""
import torch
import torch.nn as nn


class Normalize(nn.Module):
    """(x - mean) / std per channel: the first layer of every model, so inputs stay in pixel space."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std
