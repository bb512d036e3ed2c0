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
  stopped at that layer, then the gradients of ``channel_chunk`` channels' losses at a time in one
  batched backward through that prefix (``autograd.grad(..., is_grads_batched=True)``: the same
  graph, one row of the identity as each channel's output gradient); with ``steps > 1`` each
  channel's batch moves on its own, so chunks of channels run as replicas in one batched
  forward/backward; all of a layer's adversarial batches scored together under ``inference_mode``.
Ranking runs with the model in eval mode (BatchNorm uses its running statistics), so samples
do not interact and the two implementations compute the same gradients.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .evaluate import eval_mode, predict
from .hooks import output_of, outputs_of
from .pruning import ConvLayer, conv_layers

SELECT_MODES = ('fraction', 'kmeans', 'random', 'oracle_trigger')
PRUNE_MODES = ('zero', 'mask')


# --------------------------------------------------------------------------- FGSM on feature maps
def random_start(x: torch.Tensor, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """x0 = clamp(x + alpha * sign(U(-alpha, alpha)), 0, 1), the released random start."""
    noise = torch.empty(x.shape).uniform_(-alpha, alpha, generator=generator).to(x.device)
    return (x + alpha * noise.sign()).clamp(0, 1)


def channel_losses(feature: torch.Tensor, clean: torch.Tensor, objective: str = 'displace',
                   channel_dim: int = 1) -> torch.Tensor:
    """The loss the FGSM step ascends, one per feature map along ``channel_dim`` (the mean over
    every other dimension), so the gradient of channel k's entry is that of its own map alone.
    ``displace`` (FMP): MSE(F_lk(x_adv), F_lk(x)). ``excite`` (a variant of this toolkit): the mean
    activation of F_lk(x_adv), i.e. push the map up rather than anywhere away from its clean value."""
    dims = tuple(d for d in range(feature.dim()) if d != channel_dim % feature.dim())
    if objective == 'excite':
        return feature.mean(dim=dims)
    return (feature - clean).pow(2).mean(dim=dims)


def score_predictions(preds: torch.Tensor, labels: torch.Tensor, score: str = 'accuracy') -> torch.Tensor:
    """(K,) scores of K prediction batches (K, N); low means the feature map's attack hurt most.
    ``accuracy`` (FMP): the fraction of predictions equal to ``labels``. ``collapse`` (a variant of
    this toolkit): 1 - the largest fraction of predictions falling on one class (a backdoor map
    pushed hard sends every input to the target)."""
    if score == 'collapse':
        counts = torch.nn.functional.one_hot(preds, int(preds.max()) + 1).sum(1)
        return 1 - counts.max(1).values.float() / preds.shape[1]
    return (preds == labels.view(1, -1)).float().mean(1)


def fgsm_step(x_adv: torch.Tensor, x: torch.Tensor, grad_sign: torch.Tensor, eps: float, project: bool) -> torch.Tensor:
    """x_adv + eps * sign(grad), projected onto the eps-ball around x when ``project``, clamped to [0, 1]."""
    stepped = x_adv + eps * grad_sign
    if project:
        stepped = x + (stepped - x).clamp(-eps, eps)
    return stepped.clamp(0, 1)


OBJECTIVES = ('displace', 'excite')
SCORES = ('accuracy', 'collapse')


@dataclass
class RankSettings:
    alpha: float = 0.02
    eps: float = 0.06
    steps: int = 1
    channel_chunk: Optional[int] = None   # channels per batched backward; None: 1 on CPU, 32 on GPU
    score_batch: Optional[int] = None     # images per scoring forward; None: 128 on CPU (cache-sized), 4096 on GPU
    objective: str = 'displace'           # FMP; 'excite' is this toolkit's variant (see channel_losses)
    score: str = 'accuracy'               # FMP; 'collapse' is this toolkit's variant (see score_predictions)
    # fast path in NHWC (model, replicas, scoring batches): cuDNN's TF32 convolutions run NHWC, and in
    # NCHW every convolution transposes its input and output (a fifth of the ranking's GPU time, H200)
    channels_last: bool = False


def _in_layout(images: torch.Tensor, settings: RankSettings) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if settings.channels_last else images


def _layer_adversarial_fast(model, layer: ConvLayer, x, x0, clean_feature, settings: RankSettings):
    """Adversarial batches (C, N, ...) for every channel of ``layer``."""
    channels = layer.channels
    chunk = settings.channel_chunk or (1 if x.device.type == 'cpu' else 32)
    project = settings.steps > 1
    if settings.steps == 1:
        # one forward through the prefix; each chunk of channels' gradients in one batched backward
        start = x0.detach().requires_grad_(True)
        losses = channel_losses(output_of(model, layer.conv, start), clean_feature, settings.objective)
        identity = torch.eye(channels, device=x.device)
        out = torch.empty((channels,) + tuple(x.shape), device=x.device)
        for first in range(0, channels, chunk):
            last = min(first + chunk, channels)
            grads, = torch.autograd.grad(losses, start, grad_outputs=identity[first:last], is_grads_batched=True,
                                         retain_graph=last < channels)
            out[first:last] = fgsm_step(x0, x, grads.sign(), settings.eps, project)
        return out
    out = []
    for first in range(0, channels, chunk):
        ks = torch.arange(first, min(first + chunk, channels), device=x.device)
        current = x0.unsqueeze(0).expand(len(ks), *x.shape).clone()
        target = clean_feature[:, ks].transpose(0, 1)
        for _ in range(settings.steps):
            replicas = _in_layout(current.flatten(0, 1), settings).detach().requires_grad_(True)
            feature = output_of(model, layer.conv, replicas).unflatten(0, (len(ks), len(x)))
            selected = feature[torch.arange(len(ks), device=x.device), :, ks]   # (K, N, h, w): replica k's map k
            loss = channel_losses(selected, target, settings.objective, channel_dim=0).sum()
            grad, = torch.autograd.grad(loss, replicas)
            current = fgsm_step(current, x, grad.unflatten(0, (len(ks), len(x))).sign(), settings.eps, project)
        out.append(current.detach())
    return torch.cat(out)


def _scores(model, adversarial: torch.Tensor, labels: torch.Tensor, batch: int, settings: RankSettings) -> torch.Tensor:
    """Scores of ``model`` on each of the K adversarial batches (K, N, ...) (see :func:`score_predictions`)."""
    k, n = adversarial.shape[:2]
    preds = predict(model, _in_layout(adversarial.flatten(0, 1), settings), adversarial.device, batch).view(k, n)
    return score_predictions(preds, labels.cpu(), settings.score)


@contextmanager
def _model_layout(model: nn.Module, settings: RankSettings):
    """The model's 4-D weights in NHWC for the block when ``settings.channels_last``, NCHW again after."""
    if not settings.channels_last:
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def _ranked_layers(model: nn.Module, x: torch.Tensor, only: Optional[set[str]]) -> list[ConvLayer]:
    return [layer for layer in conv_layers(model, tuple(x.shape[1:])) if only is None or layer.name in only]


def rank_feature_maps(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, settings: RankSettings,
                      generator: torch.Generator, progress: bool = True,
                      only: Optional[set[str]] = None) -> dict[str, torch.Tensor]:
    """Fast ranking: {conv name: (C,) accuracy under the FGSM aimed at each feature map}
    (``only``: restrict to these conv names)."""
    layers = _ranked_layers(model, x, only)
    batch = settings.score_batch or (128 if x.device.type == 'cpu' else 4096)
    with eval_mode(model), _model_layout(model, settings):
        x0 = _in_layout(random_start(x, settings.alpha, generator), settings)
        x = _in_layout(x, settings)
        with torch.no_grad():
            clean = outputs_of(model, [layer.conv for layer in layers], x)
        result = {}
        for layer, clean_feature in zip(tqdm(layers, desc='FMP rank', disable=None if progress else True), clean):
            adversarial = _layer_adversarial_fast(model, layer, x, x0, clean_feature, settings)
            result[layer.name] = _scores(model, adversarial, labels, batch, settings)
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
                    clean = outputs_of(model, [layer.conv for layer in layers], x)[index].detach()
                    start = current.detach().requires_grad_(True)
                    adv = outputs_of(model, [layer.conv for layer in layers], start)[index]
                    loss = channel_losses(adv[:, k:k + 1], clean[:, k:k + 1], settings.objective).sum()
                    grad, = torch.autograd.grad(loss, start)
                    current = fgsm_step(current, x, grad.sign(), settings.eps, project)
                with torch.inference_mode():
                    preds = model(current).argmax(1)
                scores[k] = score_predictions(preds.view(1, -1).cpu(), labels.cpu(), settings.score)[0]
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


def lowest_channels(scores: torch.Tensor, count: int, tie_break: str = 'index') -> torch.Tensor:
    """Sorted indices of the ``count`` lowest scores. Ties: by channel index (``index``), or in
    whatever order NumPy's default ``np.argsort`` (quicksort) leaves them, as the release does
    (``argsort``)."""
    if tie_break == 'argsort':
        picked = torch.from_numpy(np.argsort(scores.double().numpy())[:count].copy())
    else:
        picked = torch.sort(scores, stable=True).indices[:count]
    return torch.sort(picked.to(torch.int64)).values


def flag_channels(scores: torch.Tensor, select: str = 'fraction', prune_exponent: int = 6,
                  min_prune: int = 0) -> torch.Tensor:
    """Channels to prune in one layer. ``fraction``: the floor(C / 2**prune_exponent) lowest
    scores (at least ``min_prune``; ties broken by channel index). ``kmeans``: :func:`two_means_minor`."""
    if select == 'kmeans':
        return two_means_minor(scores)
    return lowest_channels(scores, PruneAmount(prune_exponent, min_prune=min_prune).per_layer(len(scores)))


ROUNDINGS = {'floor': math.floor, 'round': lambda v: math.floor(v + 0.5), 'ceil': math.ceil}
SCOPES = ('layer', 'global')
TIE_BREAKS = ('index', 'argsort')


@dataclass
class PruneAmount:
    """How many feature maps to prune. Per layer of C channels: ``floor(C / 2**prune_exponent)``
    (the release's rule), or with ``prune_ratio`` set, ``prune_ratio * C`` rounded by
    ``prune_round``; at least ``min_prune`` and at most C. ``prune_scope: global`` prunes the same
    total, taken as the lowest scores across all layers after normalising each layer's scores to
    zero mean and unit variance."""
    prune_exponent: int = 6
    prune_ratio: Optional[float] = None
    prune_round: str = 'floor'
    min_prune: int = 0
    prune_scope: str = 'layer'

    def per_layer(self, channels: int) -> int:
        if self.prune_ratio is None:
            count = channels // 2 ** self.prune_exponent
        else:
            count = ROUNDINGS[self.prune_round](self.prune_ratio * channels)
        return min(channels, max(int(count), self.min_prune))

    def describe(self) -> str:
        rule = (f'1/{2 ** self.prune_exponent} per layer (floor)' if self.prune_ratio is None
                else f'{self.prune_ratio:g} per layer ({self.prune_round})')
        if self.min_prune:
            rule += f', at least {self.min_prune}'
        return rule + (', chosen across layers on per-layer normalised scores' if self.prune_scope == 'global' else '')


def fmp_flags(scores: dict[str, torch.Tensor], amount: PruneAmount, select: str = 'fraction',
              tie_break: str = 'index') -> dict[str, torch.Tensor]:
    """FMP's choice: per layer the lowest scores (``fraction``, amount by ``amount``), or the
    smaller 2-means cluster (``kmeans``); with ``prune_scope: global`` the lowest normalised
    scores across layers, as many as the per-layer rule would prune in all."""
    if select == 'kmeans':
        return {name: two_means_minor(s) for name, s in scores.items()}
    if amount.prune_scope == 'layer':
        return {name: lowest_channels(s, amount.per_layer(len(s)), tie_break) for name, s in scores.items()}
    names = list(scores)
    normalised = []
    for s in scores.values():
        s = s.double()
        spread = s.std(unbiased=False) if len(s) > 1 else torch.tensor(0.0, dtype=torch.float64)
        normalised.append((s - s.mean()) / spread if spread > 0 else torch.zeros_like(s))
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores.values())])
    channel = torch.cat([torch.arange(len(s)) for s in scores.values()])
    total = sum(amount.per_layer(len(s)) for s in scores.values())
    picked = lowest_channels(torch.cat(normalised), total, tie_break)
    return {name: torch.sort(channel[picked][owner[picked] == i]).values for i, name in enumerate(names)}


def random_channels(counts: dict[str, int], channels: dict[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The random-selection control: in every layer, ``counts[layer]`` channels drawn uniformly
    without replacement (seeded by ``generator``)."""
    return {name: torch.sort(torch.randperm(channels[name], generator=generator)[:count]).values
            for name, count in counts.items()}


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started
