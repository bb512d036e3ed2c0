"""Reading a model's intermediate outputs through forward hooks: the output of one module (the
forward stops there), of several modules from one forward, and of a model's feature stages."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class _Stop(Exception):
    pass


def output_of(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of ``module`` when ``model`` runs on ``x``; the forward stops there."""
    captured = {}

    def hook(_module, _inputs, output):
        captured['out'] = output
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if 'out' not in captured:
        raise RuntimeError(f'{type(module).__name__} did not run in the forward of {type(model).__name__}')
    return captured['out']


def outputs_of(model: nn.Module, modules: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every module in ``modules`` (its first call) from one forward of ``model`` on ``x``."""
    captured: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda m, i, o, key=index: captured.setdefault(key, o))
               for index, m in enumerate(modules)]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[index] for index in range(len(modules))]


def inputs_of(model: nn.Module, modules: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The (first) input of every module in ``modules`` (its first call) from one forward of ``model`` on ``x``."""
    captured: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda m, i, key=index: captured.setdefault(key, i[0]))
               for index, m in enumerate(modules)]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[index] for index in range(len(modules))]


def stage_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{stage name: output} for the model's ``feature_stages`` (see models.layers.ImageClassifier)."""
    names = tuple(getattr(model, 'feature_stages', ()))
    modules = dict(model.named_modules())
    return dict(zip(names, outputs_of(model, [modules[name] for name in names], x)))
