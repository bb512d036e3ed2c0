"""Model registry. Every model takes pixels in [0, 1], (N, C, H, W); normalisation is its first layer.

    model = build_model('resnet20', num_classes=10, input_shape=(3, 32, 32))
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name."""
    MODELS[fn.__name__] = fn
    return fn


def build_model(name: str, num_classes: int, input_shape: tuple[int, int, int],
                mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> nn.Module:
    """Instantiate a registered model. ``mean``/``std`` set its normalisation layer (identity when
    omitted); they are buffers, so a saved state_dict restores them."""
    from utils import UserError
    if name not in MODELS:
        raise UserError(f'unknown model {name!r} (known: {", ".join(sorted(MODELS))})')
    channels = input_shape[0]
    return MODELS[name](num_classes=num_classes, input_shape=tuple(input_shape),
                        mean=mean or (0.0,) * channels, std=std or (1.0,) * channels)


from . import mlp, preact_resnet, resnet_cifar  # noqa: E402,F401  (registers the models)
