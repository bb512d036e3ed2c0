"""Channels of a model, found through its graph, and pruning them: the core every pruning defense shares.

A unit (:class:`ConvLayer`) is a conv with the BatchNorm that consumes its output tensor
(:func:`conv_layers`, found by tracing one forward, never by module order: in ResNet downsampling
blocks module order and data flow disagree), or a BatchNorm on its own (:func:`bn_units`, the
neurons ANP, BNP and RNP mask). :func:`prune_channels` zeroes channels of units; FMP and every
pruning defense use it. :func:`trigger_lift` measures how much a record's trigger excites each
channel, for the ``oracle_trigger`` comparison every pruning defense reports."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import UserError
from .evaluate import eval_mode
from .hooks import hooks_on, inputs_of, outputs_of


@dataclass
class ConvLayer:
    """A prunable unit: ``conv`` and the BatchNorm that consumes its output directly, or (``conv``
    None) a BatchNorm on its own. ``name`` keys the unit's flags (the conv's name, or the BN's)."""
    name: str
    conv: Optional[nn.Conv2d]
    bn_name: Optional[str] = None
    bn: Optional[nn.BatchNorm2d] = None

    @property
    def channels(self) -> int:
        return self.conv.out_channels if self.conv is not None else self.bn.num_features

    @property
    def output_module(self) -> nn.Module:
        """Where the unit's channels leave it: the BatchNorm when there is one, else the conv."""
        return self.bn if self.bn is not None else self.conv


@torch.no_grad()
def traced_forward(model: nn.Module, input_shape: tuple[int, ...], model_hooks=(), pre_hooks=()) -> None:
    """One eval-mode forward of a zero image with ``hooks_on(model_hooks, pre_hooks)``: how the
    model's graph is read."""
    device = next(model.parameters()).device
    with eval_mode(model), hooks_on(model_hooks, pre_hooks):
        model(torch.zeros(1, *input_shape, device=device))


def conv_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[ConvLayer]:
    """Every ``nn.Conv2d`` in forward order, each paired with the BatchNorm whose input *is* its
    output tensor (None when its output goes elsewhere, e.g. into a residual addition)."""
    names = {module: name for name, module in model.named_modules()}
    layers: dict[str, ConvLayer] = {}
    produced: dict[int, tuple[torch.Tensor, str]] = {}

    def on_conv(module, inputs, output):
        name = names[module]
        layers.setdefault(name, ConvLayer(name, module))
        produced[id(output)] = (output, name)

    def on_bn(module, inputs):
        entry = produced.get(id(inputs[0]))
        if entry is not None and entry[0] is inputs[0] and layers[entry[1]].bn is None:
            layers[entry[1]].bn_name, layers[entry[1]].bn = names[module], module

    traced_forward(model, input_shape, [(m, on_conv) for m in model.modules() if isinstance(m, nn.Conv2d)],
                   [(m, on_bn) for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    return list(layers.values())


def bn_units(model: nn.Module, input_shape: tuple[int, ...]) -> list[ConvLayer]:
    """Every ``nn.BatchNorm2d`` that runs in a forward, in forward order, as a unit of its own."""
    names = {module: name for name, module in model.named_modules()}
    seen: dict[str, nn.BatchNorm2d] = {}

    def record(module, inputs):   # a pre-hook's return value would replace the input: return nothing
        seen.setdefault(names[module], module)

    traced_forward(model, input_shape, pre_hooks=[(m, record) for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    return [ConvLayer(name, None, name, bn) for name, bn in seen.items()]


def check_bn_units(model: nn.Module, input_shape: tuple[int, ...], model_name: str, method: str) -> list[ConvLayer]:
    """:func:`bn_units`, or a one-line error when the model has no BatchNorm."""
    units = bn_units(model, input_shape)
    if not units:
        raise UserError(f"the record's model ({model_name}) has no BatchNorm2d layers: {method} works on BatchNorm neurons")
    return units


def check_prunable(model: nn.Module, input_shape: tuple[int, ...], model_name: str, method: str) -> list[ConvLayer]:
    """:func:`conv_layers`, or a one-line error when the model has no convolution to prune."""
    layers = conv_layers(model, input_shape)
    if not layers:
        raise UserError(f"the record's model ({model_name}) has no Conv2d layers: {method} prunes convolutional channels")
    return layers


PAIRINGS = ('graph', 'module_order')


def module_order_targets(model: nn.Module, layers: list[ConvLayer]) -> list[ConvLayer]:
    """Where the FMP release applies the flags of ``layers`` (forward order): the k-th flag list
    goes to the k-th ``nn.Conv2d`` in *module* order, and every BatchNorm gets the flags of the
    conv that precedes it in module order (one before any conv gets the last list, as Python's
    index -1 does). Where module and forward order differ (PreAct-ResNet18's downsampling blocks
    rank the shortcut first) flags land on other convs, and a block's ``bn1`` gets the previous
    block's ``conv2`` (or shortcut) flags. Kept to measure the release's choice, not as a default.
    Returned as ConvLayer entries named after the forward layer whose flags they take."""
    names = [layer.name for layer in layers]
    modules = list(model.named_modules())
    convs = [module for _, module in modules if isinstance(module, nn.Conv2d)][:len(names)]
    targets = [ConvLayer(name, conv) for name, conv in zip(names, convs)]
    seen = 0   # convs met so far in module order
    for module_name, module in modules:
        if isinstance(module, nn.Conv2d):
            seen += 1
        elif isinstance(module, nn.BatchNorm2d) and names and seen <= len(names):
            k = seen - 1   # -1 before any conv, as the release's rank_list[start_idx - 1]
            targets.append(ConvLayer(names[k], convs[k], module_name, module))
    return targets


@torch.no_grad()
def prune_channels(layers: list[ConvLayer], flagged: dict[str, torch.Tensor], zero_bn_bias: bool = True) -> None:
    """Zero each flagged channel's conv weights (and bias) and its paired BatchNorm's weight and,
    with ``zero_bn_bias`` (this toolkit's default; the release keeps it), bias. Channel indices
    beyond a module's size are skipped (module-order pairing may pair layers of other widths)."""
    for layer in layers:
        channels = flagged.get(layer.name)
        if channels is None or len(channels) == 0:
            continue
        channels = torch.as_tensor(channels, dtype=torch.int64)
        if layer.conv is not None:
            own = channels[channels < layer.conv.out_channels]
            layer.conv.weight[own] = 0
            if layer.conv.bias is not None:
                layer.conv.bias[own] = 0
        if layer.bn is not None and layer.bn.affine:
            bn_channels = channels[channels < layer.bn.num_features]
            layer.bn.weight[bn_channels] = 0
            if zero_bn_bias:
                layer.bn.bias[bn_channels] = 0


def keep_pruned(layers: list[ConvLayer], flagged: dict[str, torch.Tensor],
                zero_bn_bias: bool = True) -> Callable[[nn.Module], None]:
    """``after_step`` callback of the training loop: pruned channels stay zero through fine-tuning."""
    return lambda model: prune_channels(layers, flagged, zero_bn_bias)


def above_mean_plus(scores: torch.Tensor, u: float) -> torch.Tensor:
    """Indices of the outlying scores of one unit: above mean + u * std (population std), the
    rule CLP and BNP share (Zheng et al. 2022)."""
    spread = scores.std(unbiased=False) if len(scores) > 1 else torch.tensor(0.0)
    return torch.nonzero(scores > scores.mean() + u * spread).flatten()


def highest_channels(values: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """In every unit the ``counts[unit]`` channels of highest value (ties by channel index)."""
    return {name: torch.sort(torch.sort(-values[name], stable=True).indices[:count]).values
            for name, count in counts.items()}


@torch.no_grad()
def trigger_lift(model: nn.Module, modules: dict[str, nn.Module], clean: torch.Tensor, poisoned: torch.Tensor,
                 device: torch.device, batch: int = 128, where: str = 'output') -> dict[str, torch.Tensor]:
    """Per channel of every module in ``modules`` ({name: module}): its mean activation on
    ``poisoned`` images minus on their ``clean`` versions (float in [0, 1], (N, C, H, W), same
    order), averaged over positions, read at the modules' outputs (or, ``where='input'``, their
    inputs: the classifier's input is the penultimate feature). It looks at the trigger, so it serves analysis and the
    ``oracle_trigger`` ceiling, never a defense."""
    names, targets = list(modules), list(modules.values())
    sums = {'clean': [0.0] * len(targets), 'poisoned': [0.0] * len(targets)}
    with eval_mode(model):
        for key, images in (('clean', clean), ('poisoned', poisoned)):
            for start in range(0, len(images), batch):
                chunk = images[start:start + batch].to(device)
                read = inputs_of if where == 'input' else outputs_of
                for i, out in enumerate(read(model, targets, chunk)):
                    per_channel = out.double().mean(dim=(2, 3)) if out.dim() == 4 else out.double()
                    sums[key][i] = sums[key][i] + per_channel.sum(0).cpu()
    return {name: ((sums['poisoned'][i] - sums['clean'][i]) / len(clean)).float() for i, name in enumerate(names)}
