"""FMP: Adversarial Feature Map Pruning for Backdoor (Huang & Bu, ICLR 2024).

Rank every convolutional feature map by the model's accuracy under a one-step FGSM aimed at that
map, prune the most sensitive ones per layer, fine-tune on a small clean subset (DESIGN.md §5)."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import torch

from utils import UserError
from utils.config import nonnegative_float, nonnegative_int, positive_int, run_main, str2bool
from utils.defense import Defense, DefenseResult, register_defense
from utils.fmp import PRUNE_MODES, SELECT_MODES, RankSettings, flag_channels, rank_feature_maps, rank_reference, timed
from utils.pruning import check_prunable, keep_pruned, prune_channels
from utils.record import save_csv, save_json


@register_defense
class FeatureMapPruning(Defense):
    """FMP (Huang & Bu, ICLR 2024): adversarial feature-map ranking, per-layer pruning, clean fine-tuning."""
    name = 'feature'
    default_ratio = 0.1

    def add_arguments(self, parser):
        parser.add_argument('--n_rank', type=positive_int, default=32, help='clean images used to rank the feature maps')
        parser.add_argument('--alpha', type=nonnegative_float, default=0.02, help='random-start magnitude (0.02 CIFAR-10, 0.03 CIFAR-100/GTSRB)')
        parser.add_argument('--eps', type=nonnegative_float, default=0.06, help='FGSM step size (and L-inf radius when steps > 1)')
        parser.add_argument('--steps', type=positive_int, default=1, help='FGSM steps per feature map')
        parser.add_argument('--select', default='fraction', choices=SELECT_MODES,
                            help='fraction: the floor(C / 2**prune_exponent) lowest per layer; kmeans: the smaller of two clusters')
        parser.add_argument('--prune_exponent', type=nonnegative_int, default=6, help='prune floor(C / 2**prune_exponent) channels per layer')
        parser.add_argument('--min_prune', type=nonnegative_int, default=0, help='prune at least this many channels per layer (fraction mode)')
        parser.add_argument('--prune_mode', default='zero', choices=PRUNE_MODES,
                            help='zero: zero once (released behaviour, weights may regrow); mask: keep them zero while fine-tuning')
        parser.add_argument('--channel_chunk', type=positive_int, default=None,
                            help='feature maps per batched backward (default: 1 on CPU, 32 on GPU)')
        parser.add_argument('--reference', type=str2bool, default=False, help='use the slow per-channel reference ranking')
        parser.add_argument('--rank_only', action='store_true', help='write the channel scores and stop (no pruning, no fine-tuning)')

    def check(self, args, model, clean_subset):
        self.layers = check_prunable(model, tuple(clean_subset.images.shape[1:]), args.model, 'FMP')
        if args.n_rank > len(clean_subset):
            raise UserError(f'n_rank must lie in 1..{len(clean_subset)} (the clean subset\'s size at ratio {args.ratio}), got {args.n_rank}')

    def defend(self, ctx):
        args = ctx.args
        generator = torch.Generator().manual_seed(args.random_seed)
        pick = torch.randperm(len(ctx.clean_subset), generator=generator)[:args.n_rank]
        x = ctx.clean_subset.images[pick].to(ctx.device).float() / 255
        y = ctx.clean_subset.labels[pick].to(ctx.device)
        settings = RankSettings(args.alpha, args.eps, args.steps, args.channel_chunk)
        rank = rank_reference if args.reference else rank_feature_maps
        scores, rank_seconds = timed(rank, ctx.model, x, y, settings, generator)
        layers = self.layers
        flagged = {name: flag_channels(s, args.select, args.prune_exponent, args.min_prune) for name, s in scores.items()}
        self.write_scores(ctx, layers, scores, flagged)
        total = sum(len(f) for f in flagged.values())
        ctx.log(f'ranked {sum(len(s) for s in scores.values())} feature maps in {len(scores)} conv layers '
                f'in {rank_seconds:.1f} s; flagged {total}')
        summary = {'rank_seconds': round(rank_seconds, 3), 'pruned_total': total}
        extras = {'channel_scores': scores, 'pruned_channels': flagged}
        if args.rank_only:
            return DefenseResult(data=extras, summary=summary)

        prune_channels(layers, flagged)
        pruned_metrics = ctx.evaluate()
        ctx.log('after pruning, before fine-tuning: ' + ' '.join(f'{k}={v:.4f}' for k, v in pruned_metrics.items()))
        extras['metrics_after_pruning'] = summary['after_pruning'] = pruned_metrics
        after_step = keep_pruned(layers, flagged) if args.prune_mode == 'mask' else None
        _, finetune_seconds = timed(ctx.finetune, after_step=after_step, desc='fmp finetune')
        summary['finetune_seconds'] = round(finetune_seconds, 3)
        return DefenseResult(ctx.model, data=extras, summary=summary)

    def write_scores(self, ctx, layers, scores, flagged):
        pruned = {name: set(f.tolist()) for name, f in flagged.items()}
        rows = [{'layer': name, 'channel': k, 'score': float(s[k]), 'pruned': int(k in pruned[name])}
                for name, s in scores.items() for k in range(len(s))]
        save_csv(rows, ctx.folder / 'channel_scores.csv')
        bn = {layer.name: layer.bn_name for layer in layers}
        save_json({name: {'channels': f.tolist(), 'bn': bn.get(name)} for name, f in flagged.items() if len(f)},
                  ctx.folder / 'pruned_channels.json')



def main(argv=None):
    return FeatureMapPruning().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
