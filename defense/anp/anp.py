"""ANP: adversarial neuron pruning (Wu and Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep
Models", NeurIPS 2021). Backdoored models collapse under small adversarial perturbations of their
neurons. ANP learns a mask m in [0, 1] on every BatchNorm neuron by minimising, on clean data,

    alpha * L(m, 0, 0) + (1 - alpha) * max_{delta, xi in [-eps, eps]} L(m + delta, 1 + xi)

(paper eq. 5: delta perturbs the neuron's weight, xi its bias; the inner max by ``anp_steps``
signed-gradient steps of size eps / steps from a uniform random start), then prunes the neurons
whose mask falls below a threshold (their BatchNorm weight zeroed, as ANP's pruning does).
Defaults are the paper's: eps 0.4, one step, alpha 0.2, mask learning rate 0.2 (SGD, momentum 0.9),
2,000 iterations of batch 128, threshold 0.2; no fine-tuning."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # noqa: E702

import math

import torch
import torch.nn.functional as F

from utils.config import nonnegative_float, positive_float, positive_int, probability, run_main
from utils.defense import PruningDefense, Selection, register_defense
from utils.masking import ChannelMasks, add_mask_pruning_arguments, frozen_copy, pruned_by_mask
from utils.pruning import bn_units, check_bn_units
from utils.train import TrainSettings, train


def anp_loss(masks: ChannelMasks, eps: float, steps: int, alpha: float, generator: torch.Generator):
    """The training loop's loss for ANP's mask step: the inner maximisation over the neuron
    perturbations first, then alpha * natural loss + (1 - alpha) * perturbed loss."""
    def loss(model, x, y):
        robust = 0.0
        if eps > 0:
            masks.reset_noise(eps, generator)
            masks.perturbed = True
            noise = masks.noise()
            for _ in range(steps):
                for tensor in noise:
                    tensor.requires_grad_(True)
                grads = torch.autograd.grad(F.cross_entropy(model(x), y), noise)
                with torch.no_grad():
                    for tensor, grad in zip(noise, grads):
                        tensor.add_(eps / steps * grad.sign()).clamp_(-eps, eps)
                for tensor in noise:
                    tensor.requires_grad_(False)
            robust = F.cross_entropy(model(x), y)
        masks.perturbed = False
        logits = model(x)
        return alpha * F.cross_entropy(logits, y) + (1 - alpha) * robust, logits
    return loss


@register_defense
class ANP(PruningDefense):
    """ANP (Wu & Wang, NeurIPS 2021): learn BatchNorm neuron masks under adversarial neuron perturbation, prune low masks."""
    name = 'anp'
    score_name = 'mask'

    def add_arguments(self, parser):
        group = parser.add_argument_group('anp defense')
        group.add_argument('--anp_eps', type=nonnegative_float, default=0.4, help='bound of the neuron perturbations')
        group.add_argument('--anp_steps', type=positive_int, default=1, help='steps of the inner maximisation')
        group.add_argument('--anp_alpha', type=probability, default=0.2, help='weight of the natural loss (1 - alpha: perturbed)')
        group.add_argument('--mask_lr', type=positive_float, default=0.2, help='learning rate of the masks (SGD, momentum 0.9)')
        group.add_argument('--nb_iter', type=positive_int, default=2000, help='mask-learning iterations (rounded up to whole epochs)')
        group.add_argument('--mask_batch_size', type=positive_int, default=128)
        add_mask_pruning_arguments(group)

    def check(self, args, model, clean_subset):
        self.units = check_bn_units(model, tuple(clean_subset.images.shape[1:]), args.model, 'ANP')

    def zero_bn_bias(self, args):
        return False   # ANP prunes a neuron by setting its mask, i.e. its BatchNorm weight, to zero

    def select(self, ctx):
        args = ctx.args
        model = frozen_copy(ctx.model)
        masks = ChannelMasks(bn_units(model, tuple(ctx.clean_subset.images.shape[1:])))
        per_epoch = math.ceil(len(ctx.clean_subset) / args.mask_batch_size)
        settings = TrainSettings(epochs=math.ceil(args.nb_iter / per_epoch), batch_size=args.mask_batch_size,
                                 lr=args.mask_lr, sgd_momentum=0.9, wd=0.0, lr_scheduler='none', amp=args.amp,
                                 seed=args.random_seed, augment=args.augment)
        loss = anp_loss(masks, args.anp_eps, args.anp_steps, args.anp_alpha, torch.Generator().manual_seed(args.random_seed))
        with masks.attached():
            train(model, ctx.clean_subset, settings, ctx.device, optimizer=torch.optim.SGD(masks.parameters(), lr=args.mask_lr, momentum=0.9),
                  loss_fn=loss, phase='mask', state_modules={'masks': masks}, after_step=lambda m: masks.clamp_(),
                  workdir=ctx.folder, resume=args.resume, hflip=ctx.spec.hflip, log=ctx.log, desc='anp mask')
        values = masks.values()
        return Selection(self.units, values, pruned_by_mask(masks, args.pruning_by, args.pruning_threshold, args.pruning_fraction),
                         data={'mask_values': values}, summary={'mask_epochs': settings.epochs})


def main(argv=None):
    return ANP().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
