"""FP: fine-pruning (Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks", RAID 2018). Backdoor neurons stay dormant on clean inputs: rank
the channels of the last convolutional stage (the model's ``forward_features``) by their mean
activation on clean data, prune them in increasing order until clean accuracy on held-out clean
data has dropped by ``acc_ratio`` (relative, as BackdoorBench measures it), then fine-tune the
pruned model, the pruned channels staying pruned. A channel of the last feature map is pruned by
zeroing its column of the classifier (``forward_head`` pools the map and applies ``linear``), which
removes exactly that channel from every prediction. Defaults (BackdoorBench's): acc_ratio 0.1,
steps of 1% of the channels, ratio 0.05; 10 fine-tuning epochs as FT and FMP."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # noqa: E702

import math

import torch

from utils import UserError
from utils.config import fraction, probability, run_main
from utils.data import to_float
from utils.defense import PruningDefense, Selection, register_defense
from utils.evaluate import eval_mode, evaluate


@torch.no_grad()
def mean_feature_activation(model, images: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    """(C,) mean activation of every channel of ``forward_features`` over ``images`` (uint8)."""
    total = None
    with eval_mode(model):
        for start in range(0, len(images), batch):
            features = model.forward_features(to_float(images[start:start + batch]).to(device))
            per_channel = features.mean((2, 3)) if features.dim() == 4 else features
            total = per_channel.sum(0) if total is None else total + per_channel.sum(0)
    return (total / len(images)).cpu()


@torch.no_grad()
def zero_classifier_columns(model, channels: torch.Tensor) -> None:
    model.linear.weight[:, torch.as_tensor(channels, dtype=torch.int64)] = 0


@register_defense
class FinePruning(PruningDefense):
    """FP (Liu et al., RAID 2018): prune the least active last-stage channels until held-out accuracy drops, then fine-tune."""
    name = 'fp'
    score_name = 'mean_activation'
    default_ratio = 0.05

    def add_arguments(self, parser):
        group = parser.add_argument_group('fp defense')
        group.add_argument('--acc_ratio', type=probability, default=0.1,
                           help='stop pruning before held-out clean accuracy drops by this share of its value')
        group.add_argument('--once_prune_ratio', type=fraction, default=0.01,
                           help='channels pruned per step, as a share of the last stage\'s channels (at least 1)')
        group.add_argument('--holdout', type=fraction, default=0.2,
                           help='share of the clean subset held out to measure accuracy while pruning')

    def check(self, args, model, clean_subset):
        if not (hasattr(model, 'forward_features') and hasattr(model, 'linear')):
            raise UserError(f"the record's model ({args.model}) has no forward_features/linear: FP prunes the last stage's channels")
        self.holdout_size = int(args.holdout * len(clean_subset))
        if not 1 <= self.holdout_size < len(clean_subset):
            raise UserError(f'holdout {args.holdout} of the clean subset ({len(clean_subset)} images) leaves no images '
                            'to hold out or none to rank with: raise ratio or change holdout')

    def prune(self, model, args, selection):
        zero_classifier_columns(model, selection.pruned['linear'])

    def select(self, ctx):
        args = ctx.args
        order = torch.randperm(len(ctx.clean_subset), generator=torch.Generator().manual_seed(args.random_seed))
        held_out = ctx.clean_subset.subset(order[:self.holdout_size])
        ranking = ctx.clean_subset.subset(order[self.holdout_size:])
        activation = mean_feature_activation(ctx.model, ranking.images, ctx.device)
        quietest = torch.sort(activation, stable=True).indices
        original = ctx.model.linear.weight.detach().clone()
        base = evaluate(ctx.model, held_out, None, ctx.device)['acc']
        step = max(1, math.ceil(len(activation) * args.once_prune_ratio))
        kept, trace = 0, []
        try:
            for count in range(step, len(activation) + 1, step):
                zero_classifier_columns(ctx.model, quietest[:count])
                acc = evaluate(ctx.model, held_out, None, ctx.device)['acc']
                trace.append({'pruned': count, 'held_out_acc': acc})
                if base - acc >= args.acc_ratio * base:
                    break
                kept = count
        finally:
            with torch.no_grad():
                ctx.model.linear.weight.copy_(original)
        ctx.log(f'fp: held-out accuracy {base:.4f}; {kept} of {len(activation)} last-stage channels pruned '
                f'before it drops by {args.acc_ratio:g} of its value')
        scores = {'linear': activation}
        return Selection([], scores, {'linear': quietest[:kept]},
                         lift=ctx.trigger_lift({'linear': ctx.model.linear}, where='input'),
                         data={'prune_trace': trace}, summary={'held_out_acc_before': base, 'prune_trace': trace})


def main(argv=None):
    return FinePruning().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
