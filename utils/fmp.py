"""Adversarial Feature Map Pruning (FMP; Huang & Bu, "Adversarial Feature Map Pruning for
Backdoor", ICLR 2024), as specified in DESIGN.md §5.

For every convolution l (forward order, shortcut convolutions included) and each of its output
channels k, one FGSM step pushes the images so that feature map F_lk moves away from its clean
value; the model's accuracy on those images scores the channel. Backdoor feature maps are the
most sensitive ones, so in each layer the lowest-scoring channels are flagged and pruned, then
the model is fine-tuned on clean data.

Two implementations of the ranking give the same flags:
- :func:`rank_reference` mirrors the released loop: per channel, a full forward of the clean and
  of the adversarial batch, one gradient, one scoring forward.
- :func:`rank_feature_maps` (fast): clean features once for all layers; per layer one forward
  stopped at that layer; per channel only a backward through that prefix (``channel_chunk=1``),
  or chunks of channels as replicas in one batched forward/backward (``channel_chunk>1``, for
  GPUs); all of a layer's adversarial batches scored together under ``inference_mode``.
Ranking runs with the model in eval mode (BatchNorm uses its running statistics), so samples
do not interact and the two implementations compute the same gradients.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from . import UserError
from .evaluate import eval_mode, predict

SELECT_MODES = ('fraction', 'kmeans')
PRUNE_MODES = ('zero', 'mask')


# --------------------------------------------------------------------------- model graph
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
    output tensor (found by tracing one forward, never by module order: in ResNet downsampling
    blocks module order and data flow disagree)."""
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


class _Stop(Exception):
    pass


def features_at(model: nn.Module, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The output of ``conv`` for input ``x``; the forward stops there."""
    captured = {}

    def hook(module, inputs, output):
        captured['out'] = output
        raise _Stop

    handle = conv.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured['out']


def all_features(model: nn.Module, layers: list[ConvLayer], x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every layer in ``layers`` for input ``x``, from one forward."""
    captured = {}
    handles = [layer.conv.register_forward_hook(lambda m, i, o, name=layer.name: captured.setdefault(name, o))
               for layer in layers]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[layer.name] for layer in layers]


# --------------------------------------------------------------------------- FGSM on feature maps
def random_start(x: torch.Tensor, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """x0 = clamp(x + alpha * sign(U(-alpha, alpha)), 0, 1), the released random start."""
    noise = torch.empty(x.shape).uniform_(-alpha, alpha, generator=generator).to(x.device)
    return (x + alpha * noise.sign()).clamp(0, 1)


def feature_loss(selected: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Sum over channels of MSE(F_lk(x_adv), F_lk(x)); ``selected``/``clean`` are (K, N, h, w).
    Each replica's gradient is exactly the gradient of its own channel's MSE."""
    return (selected - clean).pow(2).mean(dim=(1, 2, 3)).sum()


def fgsm_step(x_adv: torch.Tensor, x: torch.Tensor, grad_sign: torch.Tensor, eps: float, project: bool) -> torch.Tensor:
    """x_adv + eps * sign(grad), projected onto the eps-ball around x when ``project``, clamped to [0, 1]."""
    stepped = x_adv + eps * grad_sign
    if project:
        stepped = x + (stepped - x).clamp(-eps, eps)
    return stepped.clamp(0, 1)


@dataclass
class RankSettings:
    alpha: float = 0.02
    eps: float = 0.06
    steps: int = 1
    channel_chunk: Optional[int] = None   # channels per batched backward; None: 1 on CPU, 32 on GPU
    score_batch: Optional[int] = None     # images per scoring forward; None: 128 on CPU (cache-sized), 4096 on GPU


def _layer_adversarial_fast(model, layer: ConvLayer, x, x0, clean_feature, settings: RankSettings):
    """Adversarial batches (C, N, ...) for every channel of ``layer``."""
    channels = layer.channels
    chunk = settings.channel_chunk or (1 if x.device.type == 'cpu' else 32)
    project = settings.steps > 1
    if settings.steps == 1 and chunk == 1:
        # one forward through the prefix, one backward per channel through the retained graph
        start = x0.detach().requires_grad_(True)
        feature = features_at(model, layer.conv, start)
        out = torch.empty((channels,) + tuple(x.shape), device=x.device)
        for k in range(channels):
            loss = feature_loss(feature[:, k].unsqueeze(0), clean_feature[:, k].unsqueeze(0))
            grad, = torch.autograd.grad(loss, start, retain_graph=k + 1 < channels)
            out[k] = fgsm_step(x0, x, grad.sign(), settings.eps, project)
        return out
    out = []
    for first in range(0, channels, chunk):
        ks = torch.arange(first, min(first + chunk, channels), device=x.device)
        current = x0.unsqueeze(0).expand(len(ks), *x.shape).clone()
        target = clean_feature[:, ks].transpose(0, 1)
        for _ in range(settings.steps):
            replicas = current.flatten(0, 1).detach().requires_grad_(True)
            feature = features_at(model, layer.conv, replicas).unflatten(0, (len(ks), len(x)))
            loss = feature_loss(feature[torch.arange(len(ks), device=x.device), :, ks], target)
            grad, = torch.autograd.grad(loss, replicas)
            current = fgsm_step(current, x, grad.unflatten(0, (len(ks), len(x))).sign(), settings.eps, project)
        out.append(current.detach())
    return torch.cat(out)


def _scores(model, adversarial: torch.Tensor, labels: torch.Tensor, batch: int) -> torch.Tensor:
    """Accuracy of ``model`` on each of the K adversarial batches (K, N, ...) against ``labels``."""
    k, n = adversarial.shape[:2]
    preds = predict(model, adversarial.flatten(0, 1), adversarial.device, batch).view(k, n)
    return (preds == labels.cpu()).float().mean(1)


def _ranked_layers(model: nn.Module, x: torch.Tensor, only: Optional[set[str]]) -> list[ConvLayer]:
    return [layer for layer in conv_layers(model, tuple(x.shape[1:])) if only is None or layer.name in only]


def rank_feature_maps(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, settings: RankSettings,
                      generator: torch.Generator, progress: bool = True,
                      only: Optional[set[str]] = None) -> dict[str, torch.Tensor]:
    """Fast ranking: {conv name: (C,) accuracy under the FGSM aimed at each feature map}
    (``only``: restrict to these conv names)."""
    layers = _ranked_layers(model, x, only)
    batch = settings.score_batch or (128 if x.device.type == 'cpu' else 4096)
    with eval_mode(model):
        x0 = random_start(x, settings.alpha, generator)
        with torch.no_grad():
            clean = all_features(model, layers, x)
        result = {}
        for layer, clean_feature in zip(tqdm(layers, desc='FMP rank', disable=None if progress else True), clean):
            adversarial = _layer_adversarial_fast(model, layer, x, x0, clean_feature, settings)
            result[layer.name] = _scores(model, adversarial, labels, batch)
    return result


def rank_reference(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, settings: RankSettings,
                   generator: torch.Generator, progress: bool = True,
                   only: Optional[set[str]] = None) -> dict[str, torch.Tensor]:
    """Plain per-channel ranking that mirrors the released loop (slow; the fast path's oracle)."""
    layers = _ranked_layers(model, x, only)
    with eval_mode(model):
        x0 = random_start(x, settings.alpha, generator)
        project = settings.steps > 1
        result = {}
        for index, layer in enumerate(tqdm(layers, desc='FMP rank (reference)', disable=None if progress else True)):
            scores = torch.empty(layer.channels)
            for k in range(layer.channels):
                current = x0
                for _ in range(settings.steps):
                    clean = all_features(model, layers, x)[index].detach()
                    start = current.detach().requires_grad_(True)
                    adv = all_features(model, layers, start)[index]
                    loss = feature_loss(adv[:, k].unsqueeze(0), clean[:, k].unsqueeze(0))
                    grad, = torch.autograd.grad(loss, start)
                    current = fgsm_step(current, x, grad.sign(), settings.eps, project)
                with torch.inference_mode():
                    preds = model(current).argmax(1)
                scores[k] = (preds == labels).float().mean().cpu()
            result[layer.name] = scores
    return result


# --------------------------------------------------------------------------- selection
def two_means_minor(scores: torch.Tensor) -> torch.Tensor:
    """Indices of the smaller cluster of the optimal 1-D 2-means split of ``scores`` (the
    authors' clustering variant); empty when all scores are equal. Ties in size: the lower cluster."""
    values, order = torch.sort(scores.double(), stable=True)
    n = len(values)
    if n < 2 or values[0] == values[-1]:
        return torch.empty(0, dtype=torch.int64)
    best, split = None, 1
    for cut in range(1, n):  # clusters values[:cut] and values[cut:]
        if values[cut] == values[cut - 1]:
            continue  # equal scores stay together
        low, high = values[:cut], values[cut:]
        cost = ((low - low.mean()) ** 2).sum() + ((high - high.mean()) ** 2).sum()
        if best is None or cost < best:
            best, split = cost, cut
    minor = order[:split] if split <= n - split else order[split:]
    return torch.sort(minor).values


def flag_channels(scores: torch.Tensor, select: str = 'fraction', prune_exponent: int = 6,
                  min_prune: int = 0) -> torch.Tensor:
    """Channels to prune in one layer. ``fraction``: the floor(C / 2**prune_exponent) lowest
    scores (at least ``min_prune``; ties broken by channel index). ``kmeans``: :func:`two_means_minor`."""
    if select == 'kmeans':
        return two_means_minor(scores)
    count = min(len(scores), max(len(scores) // 2 ** prune_exponent, min_prune))
    lowest = torch.sort(scores, stable=True).indices[:count]
    return torch.sort(lowest).values


# --------------------------------------------------------------------------- pruning
@torch.no_grad()
def prune_channels(layers: list[ConvLayer], flagged: dict[str, torch.Tensor]) -> None:
    """Zero each flagged channel's conv weights (and bias) and its paired BatchNorm's weight and bias."""
    for layer in layers:
        channels = flagged.get(layer.name)
        if channels is None or len(channels) == 0:
            continue
        layer.conv.weight[channels] = 0
        if layer.conv.bias is not None:
            layer.conv.bias[channels] = 0
        if layer.bn is not None and layer.bn.affine:
            layer.bn.weight[channels] = 0
            layer.bn.bias[channels] = 0


def keep_pruned(layers: list[ConvLayer], flagged: dict[str, torch.Tensor]) -> Callable[[nn.Module], None]:
    """``after_step`` callback for ``prune_mode: mask``: pruned channels stay zero through fine-tuning."""
    return lambda model: prune_channels(layers, flagged)


def check_prunable(model: nn.Module, input_shape: tuple[int, ...], model_name: str) -> list[ConvLayer]:
    layers = conv_layers(model, input_shape)
    if not layers:
        raise UserError(f'the record\'s model ({model_name}) has no Conv2d layers: FMP ranks convolutional feature maps')
    return layers


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started
