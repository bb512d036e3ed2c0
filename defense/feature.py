"""FMP: Adversarial Feature Map Pruning for Backdoor (Huang & Bu, ICLR 2024).

Rank every convolutional feature map by the model's accuracy under a one-step FGSM aimed at that
map, prune the most sensitive ones per layer, fine-tune on a small clean subset (DESIGN.md §5).

Controls beside every result: ``--select random`` prunes as many maps per layer as FMP would,
chosen at random (seeded); ``--select oracle_trigger`` prunes the maps the record's trigger excites
most (it looks at the trigger: a ceiling for analysis, never a defense). Every run reports how many
of FMP's maps are among the trigger-excited ones. ``--pairing module_order``, ``--bn_bias keep``,
``--rank_augment true`` and ``--tie_break argsort`` reproduce the released code's choices."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

from dataclasses import asdict

import torch

from utils import UserError
from utils.config import fraction, nonnegative_float, nonnegative_int, positive_int, run_main, str2bool
from utils.data import augment, to_float
from utils.defense import PruningDefense, Selection, register_defense
from utils.evaluate import predict
from utils.fmp import (PRUNE_MODES, ROUNDINGS, SCOPES, SELECT_MODES, TIE_BREAKS, PruneAmount,
                       RankSettings, fmp_flags, random_channels, rank_feature_maps, rank_reference, timed)
from utils.pruning import PAIRINGS, check_prunable, conv_layers, highest_channels, module_order_targets
from utils.record import save_json, tensor_digest


def shared(a: dict, b: dict) -> int:
    """How many (layer, channel) pairs two selections have in common."""
    return sum(len(set(a[name].tolist()) & set(b.get(name, torch.empty(0)).tolist())) for name in a)


@register_defense
class FeatureMapPruning(PruningDefense):
    """FMP (Huang & Bu, ICLR 2024): adversarial feature-map ranking, per-layer pruning, clean fine-tuning."""
    name = 'feature'
    default_ratio = 0.1

    def add_arguments(self, root):
        parser = root.add_argument_group('feature-map ranking (FMP)')
        parser.add_argument('--n_rank', type=positive_int, default=32, help='clean images used to rank the feature maps')
        parser.add_argument('--alpha', type=nonnegative_float, default=0.02, help='random-start magnitude (0.02 CIFAR-10, 0.03 CIFAR-100/GTSRB)')
        parser.add_argument('--eps', type=nonnegative_float, default=0.06, help='FGSM step size (and L-inf radius when steps > 1)')
        parser.add_argument('--steps', type=positive_int, default=1, help='FGSM steps per feature map')
        parser.add_argument('--select', default='fraction', choices=SELECT_MODES,
                            help='fraction: FMP, the lowest scores by the amount rule; kmeans: FMP, the smaller of two '
                                 'score clusters per layer; random: control, as many maps per layer as FMP flags, '
                                 'chosen at random; oracle_trigger: ANALYSIS ONLY, as many maps per layer as FMP flags, '
                                 'those the record\'s poisoned test inputs excite most (it looks at the trigger)')
        parser.add_argument('--selection_seed', type=nonnegative_int, default=None,
                            help='seed of --select random (default: random_seed)')
        group = root.add_argument_group('amount pruned')
        group.add_argument('--prune_exponent', type=nonnegative_int, default=6,
                           help='prune floor(C / 2**prune_exponent) channels per layer (the release\'s rule)')
        group.add_argument('--prune_ratio', type=fraction, default=None,
                           help='prune this fraction of every layer\'s channels instead, rounded by --prune_round')
        group.add_argument('--prune_round', default='floor', choices=sorted(ROUNDINGS), help='rounding of --prune_ratio')
        group.add_argument('--min_prune', type=nonnegative_int, default=0, help='prune at least this many channels per layer')
        group.add_argument('--prune_scope', default='layer', choices=SCOPES,
                           help='layer: the rule per layer; global: the same total, lowest scores across layers '
                                '(each layer\'s scores normalised to zero mean, unit variance)')
        group.add_argument('--prune_mode', default='zero', choices=PRUNE_MODES,
                           help='zero: zero once (released behaviour, weights may regrow); mask: keep them zero while fine-tuning')
        group = root.add_argument_group('the released code\'s choices (to measure them)')
        group.add_argument('--pairing', default='graph', choices=PAIRINGS,
                           help='graph: zero the BatchNorm that consumes the conv\'s output; module_order: as released, '
                                'flags applied in module order, each BatchNorm taking the preceding conv\'s flags')
        group.add_argument('--bn_bias', default='zero', choices=('zero', 'keep'),
                           help='zero the pruned channels\' BatchNorm bias too (keep: as released, weight only)')
        group.add_argument('--rank_augment', type=str2bool, default=False,
                           help='rank on training-augmented images (crop and flip), as the release does')
        group.add_argument('--tie_break', default='index', choices=TIE_BREAKS,
                           help='equal scores: lowest channel index first, or NumPy argsort\'s order as released')
        group = root.add_argument_group('run')
        group.add_argument('--channel_chunk', type=positive_int, default=None,
                           help='feature maps per batched backward (default: 1 on CPU, 32 on GPU)')
        group.add_argument('--reference', type=str2bool, default=False, help='use the slow per-channel reference ranking')
        group.add_argument('--rank_only', action='store_true', help='write the channel scores and stop (no pruning, no fine-tuning)')

    def check(self, args, model, clean_subset):
        self.layers = check_prunable(model, tuple(clean_subset.images.shape[1:]), args.model, 'FMP')
        if args.n_rank > len(clean_subset):
            raise UserError(f'n_rank must lie in 1..{len(clean_subset)} (the clean subset\'s size at ratio {args.ratio}), got {args.n_rank}')
        if args.select == 'kmeans' and args.prune_scope == 'global':
            raise UserError('select kmeans clusters each layer\'s scores: it has no global scope (use prune_scope layer)')

    def ranking_inputs(self, ctx, generator):
        """The n_rank clean images (seeded), optionally augmented, and the labels they are scored against."""
        args = ctx.args
        pick = torch.randperm(len(ctx.clean_subset), generator=generator)[:args.n_rank]
        x = to_float(ctx.clean_subset.images[pick])
        if args.rank_augment:
            x = augment(x, generator, ctx.spec.hflip)
        x = x.to(ctx.device)
        if self.scores_against_predictions(args):
            return x, predict(ctx.model, x, ctx.device).to(ctx.device)
        return x, ctx.clean_subset.labels[pick].to(ctx.device)

    def rank_settings(self, args) -> RankSettings:
        return RankSettings(args.alpha, args.eps, args.steps, args.channel_chunk)

    def scores_against_predictions(self, args) -> bool:
        """FMP scores against the true labels (bench/fmp_ablation.py's ranking variants override this)."""
        return False

    def zero_bn_bias(self, args):
        return args.bn_bias == 'zero'

    def keep_pruned(self, args):
        return args.prune_mode == 'mask'

    def prunable_units(self, args, model, input_shape):
        layers = conv_layers(model, input_shape)
        return layers if args.pairing == 'graph' else module_order_targets(model, layers)

    def select(self, ctx):
        args = ctx.args
        generator = torch.Generator().manual_seed(args.random_seed)
        x, y = self.ranking_inputs(ctx, generator)
        settings = self.rank_settings(args)
        rank = rank_reference if args.reference else rank_feature_maps
        computed = []

        def build():
            scores, seconds = timed(rank, ctx.model, x, y, settings, generator)
            computed.append(True)
            return {'scores': scores, 'rank_seconds': seconds}
        # exact inputs of the ranking: a later run that repeats them (the random control at FMP's
        # counts, another pruning amount) reads the scores instead of ranking again
        key = {'images_and_labels': tensor_digest(x, y), 'generator': tensor_digest(generator.get_state()),
               'settings': asdict(settings), 'reference': args.reference, 'device': ctx.device.type}
        ranking = ctx.artefact('fmp_scores', key, build)
        scores, rank_seconds = ranking['scores'], ranking['rank_seconds']
        amount = PruneAmount(args.prune_exponent, args.prune_ratio, args.prune_round, args.min_prune, args.prune_scope)
        fmp = fmp_flags(scores, amount, 'kmeans' if args.select == 'kmeans' else 'fraction', args.tie_break)
        counts = {name: len(f) for name, f in fmp.items()}
        lift = ctx.trigger_lift({layer.name: layer.output_module for layer in self.layers})
        oracle = highest_channels(lift, counts)
        if args.select == 'random':
            seed = args.random_seed if args.selection_seed is None else args.selection_seed
            flagged = random_channels(counts, {layer.name: layer.channels for layer in self.layers},
                                      torch.Generator().manual_seed(seed))
        elif args.select == 'oracle_trigger':
            flagged = oracle
            ctx.log('select oracle_trigger looks at the trigger: an analysis ceiling, not a defense')
        else:
            flagged = fmp
        targets = self.layers if args.pairing == 'graph' else module_order_targets(ctx.model, self.layers)
        self.write_pruned(ctx, targets, flagged)
        reused = '' if computed else ' by an earlier run (scores reused)'
        ctx.log(f'ranked {sum(len(s) for s in scores.values())} feature maps in {len(scores)} conv layers '
                f'in {rank_seconds:.1f} s{reused}; select {args.select}, {amount.describe()}; '
                f'{shared(fmp, oracle)} of FMP\'s {sum(counts.values())} maps are among the trigger-excited ones')
        return Selection(targets, scores, flagged, lift=lift, columns={'fmp': fmp}, data={'fmp_channels': fmp},
                         summary={'rank_seconds': round(rank_seconds, 3), 'ranking_reused': not computed,
                                  'select': args.select,
                                  'amount': amount.describe(),
                                  'overlap': {'fmp_with_oracle': shared(fmp, oracle), 'selected_with_fmp': shared(flagged, fmp)}})

    def write_pruned(self, ctx, targets, flagged):
        """pruned_channels.json: per ranked conv, its pruned channels and the convs and BatchNorms zeroed for them."""
        names = {id(module): name for name, module in ctx.model.named_modules()}
        zeroed = {}
        for target in targets:
            entry = zeroed.setdefault(target.name, {'convs': [], 'bns': []})
            if names[id(target.conv)] not in entry['convs']:
                entry['convs'].append(names[id(target.conv)])
            if target.bn is not None:
                entry['bns'].append(target.bn_name)
        save_json({name: {'channels': f.tolist(), **zeroed.get(name, {})} for name, f in flagged.items() if len(f)},
                  ctx.folder / 'pruned_channels.json')


def main(argv=None):
    return FeatureMapPruning().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
