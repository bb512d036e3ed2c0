"""Channel masks on any model of the registry, for the defenses that learn which channels to prune
(ANP, RNP): a multiplicative mask per channel of each unit (:class:`utils.pruning.ConvLayer`: a
conv with its BatchNorm, or a BatchNorm on its own), applied by forward hooks where the unit's
channels leave it, so no architecture is rewritten and no per-model code is needed.

For a unit ending in an affine BatchNorm with output ``y = x_hat * gamma + beta`` the masked output
is ``(y - beta) * (m + delta) + beta * (1 + xi)``: the mask scales the BatchNorm's weight only, as
ANP's and RNP's masked BatchNorm layers do, and ``delta``/``xi`` are ANP's adversarial neuron
perturbations of weight and bias (Wu & Wang, NeurIPS 2021, eq. 3), zero unless ``perturbed``. For
other units it is ``y * (m + delta)``."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from .pruning import ConvLayer


class ChannelMasks(nn.Module):
    """Masks (parameters, initialised to 1) and perturbations (buffers) for ``units``."""

    def __init__(self, units: list[ConvLayer]):
        super().__init__()
        self.units = units
        self.masks = nn.ParameterList([nn.Parameter(torch.ones(u.channels)) for u in units])
        for i, unit in enumerate(units):
            self.register_buffer(f'weight_noise_{i}', torch.zeros(unit.channels))
            self.register_buffer(f'bias_noise_{i}', torch.zeros(unit.channels))
        self.perturbed = False

    def noise(self) -> list[torch.Tensor]:
        """The perturbation tensors (weight, then bias, per unit), for ANP's inner maximisation."""
        return [getattr(self, f'{kind}_noise_{i}') for i in range(len(self.units)) for kind in ('weight', 'bias')]

    @torch.no_grad()
    def reset_noise(self, eps: float, generator: torch.Generator | None = None) -> None:
        """Perturbations drawn uniformly from [-eps, eps] (ANP's random start)."""
        for tensor in self.noise():
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * 2 * eps - eps)

    @torch.no_grad()
    def clamp_(self, low: float = 0.0, high: float = 1.0) -> None:
        for mask in self.masks:
            mask.clamp_(low, high)

    def _masked(self, index: int, unit: ConvLayer, output: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (output.dim() - 2)
        scale = self.masks[index]
        if self.perturbed:
            scale = scale + getattr(self, f'weight_noise_{index}')
        scale = scale.to(output.dtype).view(shape)
        bn = unit.bn
        if bn is not None and bn.affine and unit.output_module is bn:
            beta = bn.bias.to(output.dtype).view(shape)
            shift = beta * (1 + getattr(self, f'bias_noise_{index}').to(output.dtype).view(shape)) if self.perturbed else beta
            return (output - beta) * scale + shift
        return output * scale

    @contextmanager
    def attached(self) -> Iterator['ChannelMasks']:
        """Within the block, every forward of the model applies the masks."""
        handles = [unit.output_module.register_forward_hook(
            lambda module, inputs, output, i=i, unit=unit: self._masked(i, unit, output))
            for i, unit in enumerate(self.units)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def values(self) -> dict[str, torch.Tensor]:
        """{unit name: mask values} (detached, on the CPU)."""
        return {unit.name: mask.detach().cpu().clone() for unit, mask in zip(self.units, self.masks)}

    def below(self, threshold: float) -> dict[str, torch.Tensor]:
        """Channels whose mask value is below ``threshold``, per unit."""
        return {name: torch.nonzero(values < threshold).flatten() for name, values in self.values().items()}

    def lowest(self, fraction: float) -> dict[str, torch.Tensor]:
        """The ``fraction`` of all channels with the lowest mask values (ties by unit, then channel)."""
        values = self.values()
        flat = torch.cat(list(values.values()))
        count = int(fraction * len(flat))
        order = torch.sort(flat, stable=True).indices[:count]
        owner = torch.cat([torch.full((len(v),), i) for i, v in enumerate(values.values())])
        channel = torch.cat([torch.arange(len(v)) for v in values.values()])
        return {name: torch.sort(channel[order][owner[order] == i]).values for i, name in enumerate(values)}


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters take no gradient (masks are learned on it)."""
    import copy
    twin = copy.deepcopy(model)
    for parameter in twin.parameters():
        parameter.requires_grad_(False)
    return twin


def pruned_by_mask(masks: ChannelMasks, pruning_by: str, threshold: float, fraction: float) -> dict[str, torch.Tensor]:
    """ANP's and RNP's pruning rules: channels whose mask is below ``threshold``, or the
    ``fraction`` of all channels with the lowest masks."""
    return masks.below(threshold) if pruning_by == 'threshold' else masks.lowest(fraction)


def add_mask_pruning_arguments(group, threshold: float = 0.2) -> None:
    """The pruning options ANP and RNP share."""
    from .config import fraction as fraction_type, probability
    group.add_argument('--pruning_by', default='threshold', choices=('threshold', 'fraction'),
                       help='threshold: prune neurons whose mask is below --pruning_threshold; fraction: the '
                            '--pruning_fraction of all neurons with the lowest masks')
    group.add_argument('--pruning_threshold', type=probability, default=threshold, help='mask value below which a neuron is pruned')
    group.add_argument('--pruning_fraction', type=fraction_type, default=0.05, help='share of neurons pruned with --pruning_by fraction')
