"""Channels of convolutional layers, found through the model's graph, and pruning them.

:func:`conv_layers` lists every ``nn.Conv2d`` in forward order, each paired with the BatchNorm
that consumes its output tensor, found by tracing one forward (never by module order: in ResNet
downsampling blocks module order and data flow disagree). :func:`prune_channels` zeroes channels
of those layers; FMP and every pruning defense share it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import UserError
from .evaluate import eval_mode


@dataclass
class ConvLayer:
    name: str
    conv: nn.Conv2d
    bn_name: Optional[str] = None      # the BatchNorm that consumes this conv's output directly
    bn: Optional[nn.BatchNorm2d] = None

    @property
    def channels(self) -> int:
        return self.conv.out_channels


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

    handles = [m.register_forward_hook(on_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_pre_hook(on_bn) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    device = next(model.parameters()).device
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return list(layers.values())


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
