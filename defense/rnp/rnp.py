"""RNP: reconstructive neuron pruning (Li, Lyu, Ma, Koren, Shen, Li and Bailey, "Reconstructive Neuron
Pruning for Backdoor Defense", ICML 2023). Two asymmetric phases on clean data: first *unlearn* the
model (gradient ascent on the clean loss, stopped once its clean training accuracy has fallen to
``clean_threshold``), which leaves the backdoor largely intact; then *recover* it by learning only a
mask m in [0, 1] on every BatchNorm neuron of the unlearned model (minimising alpha * clean loss).
Neurons the recovery leaves masked out are the backdoor's; they are pruned in the original model
(their BatchNorm weight zeroed). Defaults from the paper and its code: unlearning lr 0.01 for at
most 20 epochs down to 20% accuracy, recovering lr 0.2 for 20 epochs, alpha 0.2, batch 128,
threshold 0.2; no fine-tuning."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # noqa: E702

import copy

import torch
import torch.nn.functional as F

from utils.config import nonnegative_int, positive_float, positive_int, probability, run_main
from utils.defense import PruningDefense, Selection, register_defense
from utils.masking import ChannelMasks, add_mask_pruning_arguments, frozen_copy, pruned_by_mask
from utils.pruning import bn_units, check_bn_units
from utils.train import TrainSettings, train


def unlearning_loss(model, x, y):
    """Gradient ascent on the clean loss."""
    logits = model(x)
    return -F.cross_entropy(logits, y), logits


@register_defense
class RNP(PruningDefense):
    """RNP (Li et al., ICML 2023): unlearn on clean data, recover with BatchNorm neuron masks, prune what stays masked."""
    name = 'rnp'
    score_name = 'mask'

    def add_arguments(self, parser):
        group = parser.add_argument_group('rnp defense')
        group.add_argument('--unlearning_lr', type=positive_float, default=0.01)
        group.add_argument('--unlearning_epochs', type=nonnegative_int, default=20, help='at most this many unlearning epochs')
        group.add_argument('--clean_threshold', type=probability, default=0.2,
                           help='unlearning stops once clean training accuracy is at most this')
        group.add_argument('--recovering_lr', type=positive_float, default=0.2, help='learning rate of the masks')
        group.add_argument('--recovering_epochs', type=positive_int, default=20)
        group.add_argument('--alpha', type=positive_float, default=0.2, help='weight of the clean loss while recovering')
        group.add_argument('--mask_batch_size', type=positive_int, default=128)
        add_mask_pruning_arguments(group)

    def check(self, args, model, clean_subset):
        self.units = check_bn_units(model, tuple(clean_subset.images.shape[1:]), args.model, 'RNP')

    def zero_bn_bias(self, args):
        return False   # RNP prunes a neuron by zeroing its BatchNorm weight

    def phase_settings(self, args, epochs, lr, wd):
        return TrainSettings(epochs=epochs, batch_size=args.mask_batch_size, lr=lr, sgd_momentum=0.9, wd=wd,
                             lr_scheduler='none', amp=args.amp, seed=args.random_seed, augment=args.augment)

    def select(self, ctx):
        args = ctx.args
        common = dict(workdir=ctx.folder, resume=args.resume, hflip=ctx.spec.hflip, log=ctx.log)
        unlearned = copy.deepcopy(ctx.model)
        rows = train(unlearned, ctx.clean_subset, self.phase_settings(args, args.unlearning_epochs, args.unlearning_lr, 5e-4),
                     ctx.device, loss_fn=unlearning_loss, phase='unlearn',
                     stop_when=lambda row: row['train_acc'] <= args.clean_threshold, desc='rnp unlearn', **common)
        unlearned = frozen_copy(unlearned)
        masks = ChannelMasks(bn_units(unlearned, tuple(ctx.clean_subset.images.shape[1:])))
        recover = lambda model, x, y: (args.alpha * F.cross_entropy(logits := model(x), y), logits)  # noqa: E731
        with masks.attached():
            train(unlearned, ctx.clean_subset, self.phase_settings(args, args.recovering_epochs, args.recovering_lr, 0.0),
                  ctx.device, optimizer=torch.optim.SGD(masks.parameters(), lr=args.recovering_lr, momentum=0.9),
                  loss_fn=recover, phase='recover', state_modules={'masks': masks}, after_step=lambda m: masks.clamp_(),
                  desc='rnp recover', **common)
        values = masks.values()
        return Selection(self.units, values, pruned_by_mask(masks, args.pruning_by, args.pruning_threshold, args.pruning_fraction),
                         data={'mask_values': values},
                         summary={'unlearning_epochs_run': len(rows),
                                  'unlearned_train_acc': rows[-1]['train_acc'] if rows else None})


def main(argv=None):
    return RNP().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
