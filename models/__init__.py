"""Model registry. Every model takes pixels in [0, 1], (N, C, H, W), is an
:class:`~models.layers.ImageClassifier` (``forward_features`` / ``forward_head``), and normalises
its input in its first layer, set here from the dataset's statistics:

    model = build_model('resnet20', num_classes=10, input_shape=(3, 32, 32), dataset='cifar10')
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor ``fn(num_classes, input_shape)`` under its function name."""
    MODELS[fn.__name__] = fn
    return fn


def build_model(name: str, num_classes: int, input_shape: tuple[int, int, int], *, dataset: str | None = None,
                mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> nn.Module:
    """Instantiate a registered model, normalising its input with ``dataset``'s statistics (or the
    given ``mean``/``std``; the identity when neither is given, e.g. before loading a state_dict,
    whose buffers restore them). The only place a model's normalisation is set."""
    from utils import UserError
    if name not in MODELS:
        raise UserError(f'unknown model {name!r} (known: {", ".join(sorted(MODELS))})')
    if dataset is not None:
        from utils.data import dataset_spec
        spec = dataset_spec(dataset)
        mean, std = spec.mean, spec.std
    model = MODELS[name](num_classes=num_classes, input_shape=tuple(input_shape))
    if mean is not None or std is not None:
        channels = input_shape[0]
        model.normalize.set(mean or (0.0,) * channels, std or (1.0,) * channels)
    return model


from . import mlp, preact_resnet, resnet_cifar  # noqa: E402,F401  (registers the models)
