"""A two-layer perceptron: no convolutions. Useful for fast tests and as a model FMP must refuse."""
import math

import torch.nn as nn

from . import register_model
from .layers import ImageClassifier


class MLP(ImageClassifier):
    feature_stages = ('hidden',)

    def __init__(self, num_classes, input_shape, hidden=256):
        super().__init__(input_shape[0])
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(inplace=True))
        self.linear = nn.Linear(hidden, num_classes)

    def forward_features(self, x):
        return self.hidden(self.normalize(x))


@register_model
def mlp(num_classes, input_shape):
    return MLP(num_classes, input_shape)
