"""BNP: BatchNorm-statistics-based pruning (Zheng, Zhang, Wang and Li, "Pre-activation Distributions
Expose Backdoor Neurons", NeurIPS 2022). A BatchNorm's running statistics summarise the
pre-activations of the (poisoned) training set; on clean data a backdoor neuron's pre-activation
distribution differs from them. For every BatchNorm channel, the KL divergence between the Gaussian
of its input on the clean subset, N(mu_c, var_c), and the running one, N(mu_r, var_r):

    KL = 1/2 log(var_r / var_c) + (var_c + (mu_c - mu_r)^2) / (2 var_r) - 1/2

Channels whose divergence exceeds mean + u * std of their layer are pruned (u = 3, the paper's
default). (BackdoorBench's code omits the 1/2 of the log term; the Gaussian KL has it.)"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # noqa: E702

import torch

from utils.config import run_main
from utils.data import to_float
from utils.defense import OutlierPruning, register_defense
from utils.evaluate import eval_mode
from utils.pruning import check_bn_units


@torch.no_grad()
def input_moments(model, units, images: torch.Tensor, device, batch: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{unit name: (mean, var)} per channel of each BatchNorm's input over ``images`` (uint8)."""
    sums = {unit.name: [0.0, 0.0, 0] for unit in units}

    def hook(name):
        def collect(module, inputs):
            x = inputs[0].double().transpose(0, 1).flatten(1)       # (C, N * H * W)
            entry = sums[name]
            entry[0] = entry[0] + x.sum(1).cpu()
            entry[1] = entry[1] + x.pow(2).sum(1).cpu()
            entry[2] += x.shape[1]
        return collect

    handles = [unit.bn.register_forward_pre_hook(hook(unit.name)) for unit in units]
    try:
        with eval_mode(model):
            for start in range(0, len(images), batch):
                model(to_float(images[start:start + batch]).to(device))
    finally:
        for handle in handles:
            handle.remove()
    moments = {}
    for name, (total, squares, count) in sums.items():
        mean = total / count
        moments[name] = (mean, (squares / count - mean.pow(2)).clamp_min(0))
    return moments


def gaussian_kl(mean_p, var_p, mean_q, var_q, floor: float = 1e-5) -> torch.Tensor:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)) per channel."""
    var_p, var_q = var_p.clamp_min(floor), var_q.clamp_min(floor)
    return 0.5 * (var_q / var_p).log() + (var_p + (mean_p - mean_q).pow(2)) / (2 * var_q) - 0.5


@register_defense
class BNP(OutlierPruning):
    """BNP (Zheng et al., NeurIPS 2022): prune BatchNorm neurons whose clean-data statistics diverge from the running ones."""
    name = 'bnp'
    score_name = 'kl_divergence'

    def units(self, args, model, input_shape):
        return check_bn_units(model, input_shape, args.model, 'BNP')

    def channel_scores(self, ctx):
        moments = input_moments(ctx.model, self.scored_units, ctx.clean_subset.images, ctx.device)
        return {unit.name: gaussian_kl(*moments[unit.name], unit.bn.running_mean.double().cpu(),
                                       unit.bn.running_var.double().cpu()).float() for unit in self.scored_units}


def main(argv=None):
    return BNP().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
