"""FMP ablation: does FMP's ranking find backdoor feature maps, or would any pruning of that size do?

For every attack record given, on the same ranking and the same clean data:

1. pruning alone (cheap, the whole grid; on 2,000 clean test images and their poisoned versions): select {FMP's lowest scores, random maps at FMP's
   per-layer counts (3 seeds), the maps the trigger excites most (``oracle_trigger``, a ceiling
   that looks at the trigger)} x amount {1/64 with at least 1 per layer, 1/16, 1/8} x pairing
   {graph, module order}; plus the release's other choices (BN bias kept, ranking on augmented
   images, argsort ties) one at a time and together, on FMP's selection. ``prune_mode`` (zero vs
   mask) only matters during fine-tuning, so it is not a pruning-alone axis;
2. after fine-tuning (costly): select {FMP, random, oracle_trigger} x amount {1/64 min 1, 1/16}
   at the default mode and pairing, through ``defense/feature.py`` itself (evaluated after the last
   epoch only), beside plain fine-tuning (FT) on the same clean subset.

3. ranking variants that need no trigger knowledge (``--stage variants``): other step sizes and
   counts, more ranking images, exciting rather than displacing a map, scoring by how predictions
   collapse onto one class, scoring against the model's own predictions; each is ranked, pruned
   at 1/16 and 1/8 and compared, pruning alone, with the random rows of the same amount;
4. analysis (``--stage analysis``): where the trigger-excited maps sit in FMP's ranking, how FMP's
   scores relate to the trigger lift, and what each flagged map costs clean accuracy alone.

Rows go to ``<out>/results.csv`` (give each concurrent job its own ``--out``; ``--stage report
--merge DIR ...`` builds one report from several) (a rerun skips rows already there, so a killed run resumes);
``<out>/results.md`` holds the tables and ``<out>/asr_vs_maps.png`` the plot (ASR after fine-tuning
against maps pruned, one line per selection rule, one panel per record). Not a test: it takes hours
on a CPU.

    python bench/fmp_ablation.py --records badnet_cifar10 blended_cifar10 sig_cifar10 wanet_cifar10
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import argparse
import csv
import re
import time
from dataclasses import replace

import torch

from utils import REPO_ROOT
from utils.config import resolve_device, run_main
from utils.data import class_balanced_subset
from utils.defense import record_splits, run_defense
from utils.evaluate import evaluate
from utils.fmp import OBJECTIVES, SCORES, PruneAmount, fmp_flags, random_channels
from utils.poison import PoisonedSet
from utils.pruning import conv_layers, highest_channels, module_order_targets, prune_channels
from utils.record import load_attack_record, load_record_model, record_folder, save_text
from utils.report import VERDICT_TOLERANCE as TOLERANCE, mean_std, verdict
from utils.registry import DEFENSES

FeatureMapPruning = DEFENSES.get('feature')

AMOUNTS = {'1/64 min 1': PruneAmount(prune_exponent=6, min_prune=1), '1/16': PruneAmount(prune_exponent=4),
           '1/8': PruneAmount(prune_exponent=3)}
FINETUNE_AMOUNTS = ('1/64 min 1', '1/16')
RANDOM_SEEDS = (0, 1, 2)
FIELDS = ('record', 'attack', 'train_seed', 'stage', 'select', 'selection_seed', 'amount', 'pairing', 'variant',
          'maps', 'with_oracle', 'acc', 'asr', 'ra', 'seconds')
FEATURE_YAML = REPO_ROOT / 'config' / 'defense' / 'feature' / 'cifar10.yaml'
FT_YAML = REPO_ROOT / 'config' / 'defense' / 'ft' / 'cifar10.yaml'


def shared(a, b):
    return sum(len(set(a[n].tolist()) & set(b[n].tolist())) for n in a)


class Results:
    """results.csv, appended row by row; rows already there are skipped on a rerun."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = list(csv.DictReader(open(path))) if path.exists() else []
        self.analysis = []   # the 'ALL' rows of analysis.csv files, for the report

    @staticmethod
    def key(row):
        return tuple(str(row[k]) for k in FIELDS[:9])

    def has(self, **row):
        return any(self.key(r) == self.key({k: row.get(k, '') for k in FIELDS}) for r in self.rows)

    def add(self, **row):
        row = {k: row.get(k, '') for k in FIELDS}
        for k in ('acc', 'asr', 'ra'):
            row[k] = f'{100 * float(row[k]):.2f}'
        self.rows.append(row)
        lines = [','.join(FIELDS)] + [','.join(str(r[k]) for k in FIELDS) for r in self.rows]
        save_text('\n'.join(lines) + '\n', self.path)
        print(' '.join(f'{k}={row[k]}' for k in FIELDS), flush=True)


class RankingVariants(FeatureMapPruning):
    """FMP with this toolkit's ranking variants, for the ablation only. They are not options of
    defense/feature.py: a variant ships only once it beats random maps at the same amount on at least
    three of four attacks with two training seeds each, and none has been shown to."""

    def add_arguments(self, root):
        super().add_arguments(root)
        group = root.add_argument_group('ranking variants of this toolkit (not FMP; ablation only)')
        group.add_argument('--rank_objective', default='displace', choices=OBJECTIVES,
                           help='displace (FMP): move the map away from its clean value; excite: push the map up')
        group.add_argument('--rank_score', default='accuracy', choices=SCORES,
                           help='accuracy (FMP): accuracy under the attack; collapse: 1 - the largest share of '
                                'predictions on one class')
        group.add_argument('--rank_labels', default='true', choices=('true', 'predicted'),
                           help='true (FMP): score against the labels; predicted: against the model\'s clean predictions')

    def rank_settings(self, args):
        return replace(super().rank_settings(args), objective=args.rank_objective, score=args.rank_score)

    def scores_against_predictions(self, args):
        return args.rank_labels == 'predicted'


def ranking(record_name, args, **options):
    """FMP's ranking and trigger lift for a record, exactly as the defense computes them (a scratch
    folder per set of options, replaced on every call)."""
    suffix = re.sub(r'[^A-Za-z0-9_-]', 'p', '_'.join(f'{k}-{v}' for k, v in sorted(options.items()))) or 'default'
    config = {'yaml_path': str(FEATURE_YAML), 'result_file': record_name, 'record_root': args.record_root,
              'device': args.device, 'rank_only': True, 'save_folder_name': f'ablation_rank_{suffix}',
              'overwrite': True} | options
    return RankingVariants().run(str(DEFENSES.script('feature')), [], config)


def evaluation_sets(record, args):
    """The record's clean test split and poisoned test inputs; with ``--eval_images N`` a seeded,
    class-balanced subset of N clean test images and the poisoned versions of those images."""
    _, test, bd_test = record_splits(record)
    if args.eval_images and args.eval_images < len(test):
        chosen = class_balanced_subset(test.labels, args.eval_images / len(test), seed=12345)
        keep = torch.isin(bd_test.index, chosen)
        test = test.subset(chosen)
        bd_test = PoisonedSet(bd_test.index[keep], bd_test.images[keep], bd_test.original_labels[keep],
                              bd_test.backdoor_labels[keep])
    return test, bd_test


def pairing_groups(targets) -> dict[str, tuple[frozenset, frozenset]]:
    """Per flag list: the ids of the convs and BatchNorms it zeroes."""
    groups: dict[str, tuple[set, set]] = {}
    for t in targets:
        convs, bns = groups.setdefault(t.name, (set(), set()))
        convs.add(id(t.conv))
        if t.bn is not None:
            bns.add(id(t.bn))
    return {name: (frozenset(c), frozenset(b)) for name, (c, b) in groups.items()}


def pruning_alone(record_name, args, results):
    record = load_attack_record(record_folder(args.record_root, record_name))
    config = record['attack_config']
    device = resolve_device(args.device)
    test, bd_test = evaluation_sets(record, args)
    base = dict(record=record_name, attack=record['attack'], train_seed=config['random_seed'], stage='prune')
    ranked = ranking(record_name, args)
    scores, lift = ranked['channel_scores'], ranked['trigger_lift']
    augmented = ranking(record_name, args, rank_augment=True)['channel_scores']
    widths = {name: len(s) for name, s in scores.items()}
    probe = load_record_model(record)
    probe_layers = conv_layers(probe, tuple(record['input_shape']))
    same_pairing = pairing_groups(probe_layers) == pairing_groups(module_order_targets(probe, probe_layers))
    measured = {}

    def measure(flags, oracle, pairing='graph', zero_bn_bias=True, **row):
        row = base | {'pairing': pairing} | row
        key = (tuple((n, tuple(f.tolist())) for n, f in sorted(flags.items())), zero_bn_bias,
               pairing if not same_pairing else 'graph')
        if results.has(**row):
            return
        started = time.time()
        if key not in measured:   # module order pairs as the graph does on this model: the same pruned weights
            model = load_record_model(record).to(device)
            layers = conv_layers(model, tuple(record['input_shape']))
            prune_channels(layers if pairing == 'graph' else module_order_targets(model, layers), flags, zero_bn_bias)
            measured[key] = evaluate(model, test, bd_test, device)
        results.add(**row, maps=sum(len(f) for f in flags.values()), with_oracle=shared(flags, oracle),
                    **measured[key], seconds=round(time.time() - started, 1))

    for label, amount in AMOUNTS.items():
        fmp = fmp_flags(scores, amount)
        counts = {name: len(f) for name, f in fmp.items()}
        oracle = highest_channels(lift, counts)
        selections = [('fmp', '', fmp), ('oracle_trigger', '', oracle)]
        selections += [('random', seed, random_channels(counts, widths, torch.Generator().manual_seed(seed)))
                       for seed in RANDOM_SEEDS]
        for pairing in ('graph', 'module_order'):
            for select, seed, flags in selections:
                measure(flags, oracle, pairing, select=select, selection_seed=seed, amount=label, variant='')
        # the release's other choices, on FMP's selection: each alone, then all four together
        measure(fmp, oracle, zero_bn_bias=False, select='fmp', amount=label, variant='bn_bias keep')
        measure(fmp_flags(scores, amount, tie_break='argsort'), oracle, select='fmp', amount=label, variant='tie_break argsort')
        measure(fmp_flags(augmented, amount), oracle, select='fmp', amount=label, variant='rank_augment')
        measure(fmp_flags(augmented, amount, tie_break='argsort'), oracle, 'module_order', zero_bn_bias=False,
                select='fmp', amount=label, variant='released (all four)')


# variants of the ranking that need no trigger knowledge: name -> options of defense/feature.py
VARIANTS = {'eps 0.01': {'eps': 0.01}, 'steps 5': {'steps': 5}, 'n_rank 128': {'n_rank': 128},
            'excite': {'rank_objective': 'excite'}, 'collapse': {'rank_score': 'collapse'},
            'predicted labels': {'rank_labels': 'predicted'},
            'excite + collapse': {'rank_objective': 'excite', 'rank_score': 'collapse'}}
VARIANT_AMOUNTS = ('1/16', '1/8')


def record_setup(record_name, args):
    record = load_attack_record(record_folder(args.record_root, record_name))
    return (record, *evaluation_sets(record, args))


def prune_and_evaluate(record, flags, test, bd_test, device, pairing='graph', zero_bn_bias=True):
    model = load_record_model(record).to(device)
    layers = conv_layers(model, tuple(record['input_shape']))
    prune_channels(layers if pairing == 'graph' else module_order_targets(model, layers), flags, zero_bn_bias)
    return evaluate(model, test, bd_test, device)


def variants(record_name, args, results):
    record, test, bd_test = record_setup(record_name, args)
    device = resolve_device(args.device)
    base = dict(record=record_name, attack=record['attack'], train_seed=record['attack_config']['random_seed'],
                stage='prune', select='fmp', pairing='graph')
    lift = None
    for name, options in VARIANTS.items():
        if all(results.has(**base, amount=label, variant=name) for label in VARIANT_AMOUNTS):
            continue
        ranked = ranking(record_name, args, **options)
        scores, lift = ranked['channel_scores'], ranked['trigger_lift']
        for label in VARIANT_AMOUNTS:
            if results.has(**base, amount=label, variant=name):
                continue
            started = time.time()
            flags = fmp_flags(scores, AMOUNTS[label])
            oracle = highest_channels(lift, {n: len(f) for n, f in flags.items()})
            metrics = prune_and_evaluate(record, flags, test, bd_test, device)
            results.add(**base, amount=label, variant=name, maps=sum(len(f) for f in flags.values()),
                        with_oracle=shared(flags, oracle), **metrics, seconds=round(time.time() - started, 1))


def spearman(a, b):
    rank = lambda v: torch.argsort(torch.argsort(v.double())).double()  # noqa: E731
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra * rb).sum() / denominator) if denominator else float('nan')


def analysis(record_name, args, out: Path):
    """Why FMP's ranking does or does not find the backdoor maps, in numbers (appended to analysis.csv)."""
    record, test, bd_test = record_setup(record_name, args)
    device = resolve_device(args.device)
    ranked = ranking(record_name, args)
    scores, lift = ranked['channel_scores'], ranked['trigger_lift']
    counts = {n: len(f) for n, f in fmp_flags(scores, AMOUNTS['1/64 min 1']).items()}
    fmp = fmp_flags(scores, AMOUNTS['1/64 min 1'])
    oracle = highest_channels(lift, counts)
    rows = []
    # where the most trigger-excited map of each layer sits in FMP's ranking (0: FMP's first choice, 1: its last)
    for name, s in scores.items():
        order = torch.sort(s, stable=True).indices
        position = {int(c): i / max(1, len(s) - 1) for i, c in enumerate(order)}
        top = int(torch.argmax(lift[name]))
        rows.append({'record': record_name, 'layer': name, 'channels': len(s),
                     'score_min': f'{float(s.min()):.3f}', 'score_median': f'{float(s.median()):.3f}',
                     'score_max': f'{float(s.max()):.3f}', 'distinct_scores': len(torch.unique(s)),
                     'spearman_score_lift': f'{spearman(s, lift[name]):.3f}',
                     'top_lift_channel': top, 'top_lift': f'{float(lift[name][top]):.3f}',
                     'top_lift_rank_in_fmp': f'{position[top]:.2f}',
                     'fmp_flagged': ' '.join(map(str, fmp[name].tolist())),
                     'fmp_flagged_lift': ' '.join(f'{float(lift[name][c]):.3f}' for c in fmp[name])})
    # clean cost of each flagged map alone: ACC drop on 2,000 clean test images when only that map is pruned
    small = test.subset(torch.arange(0, len(test), max(1, len(test) // 2000)))
    base_acc = evaluate(load_record_model(record).to(device), small, None, device)['acc']
    costs = {}
    for label, flags in (('fmp', fmp), ('oracle_trigger', oracle)):
        drops = []
        for name, channels in flags.items():
            for c in channels.tolist():
                acc = prune_and_evaluate(record, {name: torch.tensor([c])}, small, None, device)['acc']
                drops.append(base_acc - acc)
        costs[label] = drops
    summary = {'record': record_name, 'layer': 'ALL', 'channels': sum(len(s) for s in scores.values()),
               'fmp_single_map_acc_drop_mean': f'{100 * sum(costs["fmp"]) / len(costs["fmp"]):.2f}',
               'oracle_single_map_acc_drop_mean': f'{100 * sum(costs["oracle_trigger"]) / len(costs["oracle_trigger"]):.2f}',
               'spearman_score_lift': f'{spearman(torch.cat(list(scores.values())), torch.cat(list(lift.values()))):.3f}'}
    rows.append(summary)
    path = out / 'analysis.csv'
    previous = [r for r in (list(csv.DictReader(open(path))) if path.exists() else []) if r['record'] != record_name]
    fields = list(dict.fromkeys(k for r in previous + rows for k in r))
    with open(path, 'w', newline='') as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(previous + rows)
    print(summary, flush=True)


def after_finetuning(record_name, args, results):
    record = load_attack_record(record_folder(args.record_root, record_name))
    config = record['attack_config']
    base = dict(record=record_name, attack=record['attack'], train_seed=config['random_seed'], stage='finetune',
                pairing='graph', variant='')
    common = {'result_file': record_name, 'record_root': args.record_root, 'device': args.device,
              'eval_each_epoch': False}
    runs = [('ft', '', '', {'yaml_path': str(FT_YAML), 'ratio': 0.1})]
    for label in FINETUNE_AMOUNTS:
        amount = AMOUNTS[label]
        options = {'yaml_path': str(FEATURE_YAML), 'prune_exponent': amount.prune_exponent, 'min_prune': amount.min_prune}
        runs += [('fmp', '', label, options | {'select': 'fraction'}),
                 ('random', 0, label, options | {'select': 'random', 'selection_seed': 0}),
                 ('oracle_trigger', '', label, options | {'select': 'oracle_trigger'})]
    for select, seed, label, options in runs:
        row = base | dict(select=select, selection_seed=seed, amount=label)
        if results.has(**row):
            continue
        folder = f"ablation_{select}{seed}_{label.replace('/', '_').replace(' ', '_')}" if label else 'ablation_ft'
        started = time.time()
        defense = 'ft' if select == 'ft' else 'feature'
        out = record_folder(args.record_root, record_name) / 'defense' / folder
        result = run_defense(defense, common | options | {'save_folder_name': folder, 'resume': out.exists()})
        overlap = result.get('overlap', {})
        results.add(**row, maps=overlap.get('total', 0), with_oracle=overlap.get('with_oracle', ''),
                    **{k: result['metrics'][k] for k in ('acc', 'asr', 'ra')}, seconds=round(time.time() - started, 1))


RELEASE_CHOICES = ('bn_bias keep', 'tie_break argsort', 'rank_augment', 'released (all four)')


def pick(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def report(results, out: Path):
    """results.md: a verdict per record and amount (FMP and each ranking variant against random maps at
    the same per-layer counts), then per record the full grid, the release's choices and the analysis."""
    rows = results.rows
    records = list(dict.fromkeys(r['record'] for r in rows))
    default = dict(pairing='graph', variant='')
    lines = ['# FMP ablation', '',
             'ACC / ASR in percent. Pruning alone: on a seeded, class-balanced subset of the clean test set '
             '(`--eval_images`, 2,000 by default) and the poisoned versions of those images; after fine-tuning: '
             'the whole test sets. random: mean ± std over selection seeds (three when pruning alone, one or two after '
             'fine-tuning), the same per-layer counts as FMP. "with oracle": how many of FMP\'s maps are among '
             'the maps the trigger excites most (`oracle_trigger`, which looks at the trigger: a ceiling, not a '
             f'defense). Verdict against random: *better* only when the ASR is more than {TOLERANCE:g} point below '
             f'every random seed\'s and the ACC not more than {TOLERANCE:g} point below every seed\'s; *worse* when '
             f'the ASR is that far above every seed\'s, or the ACC that far below without a lower ASR.', '',
             '## Verdict: FMP\'s ranking against random maps at the same amount', '',
             '| record | stage | amount | maps | FMP ACC / ASR | random ACC / ASR | oracle ACC / ASR | FMP with oracle | verdict |',
             '|---|---|---|---|---|---|---|---|---|']
    for record in records:
        mine = pick(rows, record=record)
        for stage in ('prune', 'finetune'):
            for amount in dict.fromkeys(r['amount'] for r in mine if r['stage'] == stage and r['amount']):
                same = dict(stage=stage, amount=amount, **default)
                fmp, randoms = pick(mine, select='fmp', **same), pick(mine, select='random', **same)
                oracle = pick(mine, select='oracle_trigger', **same)
                if not fmp:
                    continue
                fmp = fmp[0]
                random_cell = (f"{mean_std(r['acc'] for r in randoms)} / {mean_std(r['asr'] for r in randoms)}"
                               if randoms else '')
                oracle_cell = f"{oracle[0]['acc']} / {oracle[0]['asr']}" if oracle else ''
                lines.append(f"| {record} | {'pruning alone' if stage == 'prune' else 'fine-tuned'} | {amount} | "
                             f"{fmp['maps']} | {fmp['acc']} / {fmp['asr']} | {random_cell} | {oracle_cell} | "
                             f"{fmp['with_oracle']} of {fmp['maps']} | {verdict(fmp, randoms)} |")
        ft = pick(mine, select='ft')
        if ft:
            lines.append(f"| {record} | fine-tuned | FT alone | 0 | {ft[0]['acc']} / {ft[0]['asr']} | | | | |")
    toolkit = [r for r in rows if r['stage'] == 'prune' and r['variant'] and r['variant'] not in RELEASE_CHOICES]
    if toolkit:
        lines += ['', '## Ranking variants that need no trigger knowledge, pruning alone, against random', '',
                  '| variant | ' + ' | '.join(f'{r} {a}' for r in records for a in ('1/16', '1/8')
                                             if pick(toolkit, record=r, amount=a)) + ' |']
        columns = [(r, a) for r in records for a in ('1/16', '1/8') if pick(toolkit, record=r, amount=a)]
        lines.append('|---|' + '---|' * len(columns))
        for name in dict.fromkeys(r['variant'] for r in toolkit):
            cells = []
            for record, amount in columns:
                row = pick(toolkit, record=record, amount=amount, variant=name)
                randoms = pick(rows, record=record, amount=amount, stage='prune', select='random', **default)
                cells.append(f"{row[0]['acc']} / {row[0]['asr']} ({verdict(row[0], randoms)})" if row else '')
            lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    for record in records:
        mine = pick(rows, record=record)
        lines += ['', f'## {record} ({mine[0]["attack"]}, training seed {mine[0]["train_seed"]})']
        release = [r for r in mine if r['stage'] == 'prune' and r['select'] == 'fmp'
                   and (r['variant'] in RELEASE_CHOICES or (r['pairing'] == 'module_order' and not r['variant']))]
        if release:
            lines += ['', 'The release\'s choices on FMP\'s selection, pruning alone (ACC / ASR):', '',
                      '| amount | choice | ACC / ASR | toolkit default ACC / ASR |', '|---|---|---|---|']
            for r in release:
                base = pick(mine, stage='prune', amount=r['amount'], select='fmp', **default)
                base = f"{base[0]['acc']} / {base[0]['asr']}" if base else ''
                lines.append(f"| {r['amount']} | {r['variant'] or 'pairing module_order'} | {r['acc']} / {r['asr']} | {base} |")
        seeds = pick(mine, stage='prune', select='random', **default)
        if seeds:
            lines += ['', 'Random selections one by one, pruning alone (ACC / ASR):', '',
                      '| amount | ' + ' | '.join(f'seed {s}' for s in dict.fromkeys(r['selection_seed'] for r in seeds)) + ' |',
                      '|---|' + '---|' * len(dict.fromkeys(r['selection_seed'] for r in seeds))]
            for amount in dict.fromkeys(r['amount'] for r in seeds):
                lines.append(f'| {amount} | ' + ' | '.join(f"{r['acc']} / {r['asr']}" for r in pick(seeds, amount=amount)) + ' |')
    analyses = list({a['record']: a for a in results.analysis if a.get('layer') == 'ALL'}.values())
    if analyses:
        lines += ['', '## Why: what FMP flags (1/64 rule), from `--stage analysis`', '',
                  '| record | maps | Spearman(FMP score, trigger lift) | clean ACC lost pruning one FMP map alone (mean) | '
                  'the same for one oracle map |', '|---|---|---|---|---|']
        for a in analyses:
            lines.append(f"| {a['record']} | {a['channels']} | {a['spearman_score_lift']} | "
                         f"{a['fmp_single_map_acc_drop_mean']} | {a['oracle_single_map_acc_drop_mean']} |")
    lines.append('')
    save_text('\n'.join(lines), out / 'results.md')


def plot(results, out: Path):
    """ASR after fine-tuning against maps pruned, one line per selection rule (random: the mean of its
    draws, bars from the lowest to the highest), one panel per record."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [r for r in results.rows if r['stage'] == 'finetune']
    records = list(dict.fromkeys(r['record'] for r in rows))
    if not records:
        return
    fig, axes = plt.subplots(1, len(records), figsize=(4 * len(records), 3.6), squeeze=False, sharey=True)
    styles = {'fmp': ('FMP', 'tab:blue', 'o'), 'random': ('random (same counts)', 'tab:gray', 's'),
              'oracle_trigger': ('oracle_trigger (ceiling)', 'tab:green', '^')}
    for ax, record in zip(axes[0], records):
        mine = [r for r in rows if r['record'] == record]
        ft = next((float(r['asr']) for r in mine if r['select'] == 'ft'), None)
        for select, (label, color, marker) in styles.items():
            by_maps = {}   # maps pruned -> ASR of each draw (random: one per selection seed)
            for r in mine:
                if r['select'] == select:
                    by_maps.setdefault(int(r['maps']), []).append(float(r['asr']))
            if ft is not None and by_maps:
                by_maps[0] = [ft]
            if by_maps:
                maps = sorted(by_maps)
                mean = [sum(by_maps[m]) / len(by_maps[m]) for m in maps]
                spread = [[mu - min(by_maps[m]) for m, mu in zip(maps, mean)], [max(by_maps[m]) - mu for m, mu in zip(maps, mean)]]
                ax.errorbar(maps, mean, yerr=spread, marker=marker, color=color, label=label, capsize=3)
        ax.set_title(f"{record} ({mine[0]['attack']})", fontsize=10)
        ax.set_xlabel('feature maps pruned (0: FT alone)')
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('ASR after fine-tuning (%)')
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / 'asr_vs_maps.png', dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--records', nargs='*', default=[], help='attack records (record/<name>/) to ablate')
    parser.add_argument('--record_root', default=str(REPO_ROOT / 'record'))
    parser.add_argument('--out', default=str(REPO_ROOT / 'record' / 'ablation'), help='folder of results.csv/.md/.png')
    parser.add_argument('--stage', default='all', choices=('prune', 'finetune', 'variants', 'analysis', 'all', 'report'),
                        help='all: prune and finetune (variants and analysis run on request)')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--eval_images', type=int, default=2000,
                        help='pruning-alone figures on a seeded, class-balanced subset of this many clean test images and '
                             'their poisoned versions (0: the whole test set); fine-tuned figures always use the whole set')
    parser.add_argument('--merge', nargs='*', default=[], help='with --stage report: folders whose results.csv join the report')
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out / 'results.csv')
    for folder in args.merge:
        results.rows += Results(Path(folder) / 'results.csv').rows
    results.analysis = [row for folder in [out, *map(Path, args.merge)] if (folder / 'analysis.csv').exists()
                        for row in csv.DictReader(open(folder / 'analysis.csv'))]
    for name in args.records:
        if args.stage in ('prune', 'all'):
            pruning_alone(name, args, results)
        if args.stage in ('finetune', 'all'):
            after_finetuning(name, args, results)
        if args.stage == 'variants':
            variants(name, args, results)
        if args.stage == 'analysis':
            analysis(name, args, out)
    report(results, out)
    plot(results, out)
    print(f'wrote {out / "results.csv"}, {out / "results.md"}, {out / "asr_vs_maps.png"}')


if __name__ == '__main__':
    sys.exit(run_main(main))
