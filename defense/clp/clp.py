"""CLP: channel Lipschitzness-based pruning (Zheng, Zhang, Wang and Li, "Data-Free Backdoor Removal
Based on Channel Lipschitzness", ECCV 2022). Data-free: for every output channel k of a conv with
its BatchNorm, the upper bound of the channel's Lipschitz constant is the largest singular value of
its kernel W_k (reshaped to in_channels x kernel area) scaled by |gamma_k / sigma_k|
(paper eq. 6; sigma_k the running standard deviation); a conv without a BatchNorm uses W_k alone.
Channels whose bound exceeds mean + u * std of their layer are pruned (u = 3, the paper's default)."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # noqa: E702

import torch

from utils.config import run_main
from utils.defense import OutlierPruning, register_defense
from utils.pruning import check_prunable


def channel_lipschitz_bounds(layer) -> torch.Tensor:
    """(C,) upper bounds of the Lipschitz constants of ``layer``'s output channels."""
    weight = layer.conv.weight.detach().flatten(2)          # (C, in, kh * kw)
    if layer.bn is not None:
        scale = (layer.bn.weight.detach() if layer.bn.affine else torch.ones(layer.channels))
        weight = weight * (scale / (layer.bn.running_var + layer.bn.eps).sqrt()).abs().view(-1, 1, 1)
    return torch.linalg.matrix_norm(weight.double(), ord=2).float().cpu()


@register_defense
class CLP(OutlierPruning):
    """CLP (Zheng et al., ECCV 2022): prune channels with an outlying Lipschitz upper bound; data-free."""
    name = 'clp'
    score_name = 'lipschitz_bound'

    def units(self, args, model, input_shape):
        return check_prunable(model, input_shape, args.model, 'CLP')

    def channel_scores(self, ctx):
        return {unit.name: channel_lipschitz_bounds(unit) for unit in self.scored_units}


def main(argv=None):
    return CLP().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
