"""Reading a model's intermediate outputs through forward hooks: the output of one module (the
forward stops there), of several modules from one forward, and of a model's feature stages."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

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


@contextmanager
def hooks_on(model_hooks: Sequence[tuple[nn.Module, Callable]] = (), pre_hooks: Sequence[tuple[nn.Module, Callable]] = ()):
    """Forward hooks (``(module, fn(module, inputs, output))``) and pre-hooks (``(module, fn(module,
    inputs))``) registered for the block and removed after it, however it ends."""
    handles = [module.register_forward_hook(fn) for module, fn in model_hooks]
    handles += [module.register_forward_pre_hook(fn) for module, fn in pre_hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def captured_in_forward(model: nn.Module, modules: Sequence[nn.Module], x: torch.Tensor, where: str) -> list[torch.Tensor]:
    """The output (``where='output'``) or first input (``'input'``) of every module in ``modules``,
    at its first call, from one forward of ``model`` on ``x``."""
    captured: dict[int, torch.Tensor] = {}

    def keep(key, value):          # returns None: a hook's return value would replace the tensor
        captured.setdefault(key, value)

    if where == 'output':
        hooks = {'model_hooks': [(m, lambda mod, i, o, k=k: keep(k, o)) for k, m in enumerate(modules)]}
    else:
        hooks = {'pre_hooks': [(m, lambda mod, i, k=k: keep(k, i[0])) for k, m in enumerate(modules)]}
    with hooks_on(**hooks):
        model(x)
    return [captured[index] for index in range(len(modules))]


def outputs_of(model: nn.Module, modules: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every module in ``modules`` (its first call) from one forward of ``model`` on ``x``."""
    return captured_in_forward(model, modules, x, 'output')


def inputs_of(model: nn.Module, modules: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The first input of every module in ``modules`` (its first call) from one forward of ``model`` on ``x``."""
    return captured_in_forward(model, modules, x, 'input')


def stage_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{stage name: output} for the model's ``feature_stages`` (see models.layers.ImageClassifier)."""
    names = tuple(getattr(model, 'feature_stages', ()))
    modules = dict(model.named_modules())
    return dict(zip(names, outputs_of(model, [modules[name] for name in names], x)))
