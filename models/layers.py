"""Layers and the base class shared by the models."""
from __future__ import annotations

import torch
import torch.nn as nn


class Normalize(nn.Module):
    """(x - mean) / std per channel: the first layer of every model, so inputs stay in pixel space.
    Built as the identity; :func:`models.build_model` sets the dataset's statistics."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer('mean', torch.zeros(1, channels, 1, 1))
        self.register_buffer('std', torch.ones(1, channels, 1, 1))

    @torch.no_grad()
    def set(self, mean, std) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view_as(self.mean))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32).view_as(self.std))

    def forward(self, x):
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """Base of every registry model: pixels in [0, 1], (N, C, H, W) -> logits, with one feature
    API (as timm's models have) that feature-based defenses share:

    - ``forward_features(x)``: the last feature map before pooling, (N, C, h, w) (an MLP: (N, D));
    - ``forward_head(features, pre_logits=False)``: the pooled, flattened features (the
      penultimate layer) when ``pre_logits``, else the logits;
    - ``feature_stages``: names of the modules whose outputs are the per-stage features
      (:func:`utils.hooks.stage_outputs` collects them in one forward).

    ``forward(x) == forward_head(forward_features(x))``; normalisation is ``self.normalize``; the
    classifier is ``self.linear``."""
    feature_stages: tuple[str, ...] = ()

    def __init__(self, in_channels: int):
        super().__init__()
        self.normalize = Normalize(in_channels)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f'{type(self).__name__} must implement forward_features')

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling of a feature map (flat features pass through), then ``self.linear``."""
        pooled = features.mean((2, 3)) if features.dim() == 4 else features
        return pooled if pre_logits else self.linear(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
