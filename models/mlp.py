"""A two-layer perceptron: no convolutions. Useful for fast tests and as a model FMP must refuse."""
import math

import torch.nn as nn

from . import register_model
from .layers import Normalize


@register_model
def mlp(num_classes, input_shape, mean, std, hidden=256):
    return nn.Sequential(Normalize(mean, std), nn.Flatten(), nn.Linear(math.prod(input_shape), hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
