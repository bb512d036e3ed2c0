"""Every defense on the same attack records, with the same clean data: one table per record.

For each record and each defense of the registry that has a ``config/defense/<name>/cifar10.yaml``
(plus FMP's random-selection control at FMP's per-layer counts), the defense runs with its YAML as
shipped and ``--ratio`` (default 0.1, FMP's), so every defense sees the same seeded, class-balanced
clean images. The table gives ACC, ASR, RA, DER, wall time and, for the pruning defenses, how many
of the channels each pruned are among the channels the trigger excites most at the same counts
(beside the number random choice would give in expectation), and the control for every pruning
defense: its pruning alone (before any fine-tuning) beside pruning the same number of channels per
unit drawn at random, pruned the same way (``--random_draws`` seeded draws; mean and standard
deviation). Runs whose defense record exists are read, not rerun, so a killed table resumes; the
random draws are kept in ``record/<record>/random_control.json`` and reused while the defense
record they copy is unchanged.

    python bench/defense_table.py --records badnet_cifar10 blended_cifar10 sig_cifar10 wanet_cifar10
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import argparse
import json
import statistics
import time

import torch

from utils import REPO_ROOT
from utils.config import positive_int, resolve_device, run_main
from utils.defense import defense_identity, record_splits, run_defense
from utils.evaluate import evaluate
from utils.fmp import random_channels
from utils.record import (DEFENSE_RESULT, load_attack_record, load_record_model, load_torch, record_folder, save_json,
                          save_text)
from utils.registry import DEFENSES
from utils.runs import RUN_FILE

CONFIG = REPO_ROOT / 'config' / 'defense'


# a few minutes for the whole set: the check of the pipeline, not figures
SMOKE = {'ft': {'epochs': 1}, 'feature': {'epochs': 1}, 'fp': {'epochs': 1}, 'anp': {'nb_iter': 20},
         'rnp': {'unlearning_epochs': 1, 'recovering_epochs': 1}}


def defense_runs(overrides: dict[str, dict] | None = None) -> list[tuple[str, str, dict]]:
    """(folder, defense, options): every defense with a CIFAR-10 YAML and FMP's random control;
    ``overrides`` adds options per defense name (e.g. :data:`SMOKE`)."""
    runs = [(name, name, {}) for name in DEFENSES.names() if (CONFIG / name / 'cifar10.yaml').is_file()]
    runs.append(('feature_random', 'feature', {'select': 'random'}))
    return [(folder, defense, options | (overrides or {}).get(defense, {})) for folder, defense, options in runs]


def identical_run(record: Path, identity: dict) -> Path | None:
    """A finished defense run of ``record`` whose run.json identity is ``identity``, if any (an
    ablation's FT at the same options is the table's FT)."""
    for run_file in sorted((record / 'defense').glob(f'*/{RUN_FILE}')):
        if (run_file.parent / DEFENSE_RESULT).exists() and json.loads(run_file.read_text()).get('identity') == identity:
            return run_file.parent
    return None


def random_control(record: dict, result: dict, test, bd_test, device, draws: int) -> dict | None:
    """Pruning alone with channels drawn at random at a defense's own per-unit counts, pruned the way
    the defense prunes them (seeds 0 .. draws-1): ACC and ASR of every draw. Beside the defense's own
    pruning-alone result it shows whether its choice of channels, not their number, did the work.
    None for a defense record that pruned nothing."""
    counts = {name: len(c) for name, c in (result.get('pruned_channels') or {}).items() if len(c)}
    if not counts or 'metrics_after_pruning' not in result:
        return None
    widths = {name: len(scores) for name, scores in result['channel_scores'].items()}
    defense = DEFENSES.get(result['defense'])()
    args = argparse.Namespace(**result['defense_config'])
    draws_metrics = []
    for seed in range(draws):
        model = load_record_model(record).to(device)
        defense.prune_at(model, args, tuple(record['input_shape']),
                         random_channels(counts, widths, torch.Generator().manual_seed(seed)))
        draws_metrics.append(evaluate(model, test, bd_test, device))
    return {key: [m[key] for m in draws_metrics] for key in ('acc', 'asr', 'ra')}


def cached_random_control(folder: Path, defense_folder: Path, record: dict, result: dict, splits, device,
                          draws: int) -> dict | None:
    """:func:`random_control`, kept in ``<record>/random_control.json`` per defense folder and reused
    while that defense record (its sha256) and the number of draws are unchanged."""
    cache_file = folder / 'random_control.json'
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    sha256 = json.loads((defense_folder / 'summary.json').read_text()).get('sha256')
    kept = cache.get(defense_folder.name)
    if kept is not None and kept['sha256'] == sha256 and (kept['draws'] is None or len(kept['draws']['acc']) == draws):
        return kept['draws']
    if splits.get('sets') is None:
        splits['sets'] = record_splits(record)[1:]
    measured = random_control(record, result, *splits['sets'], device, draws)
    cache[defense_folder.name] = {'sha256': sha256, 'draws': measured}
    save_json(cache, cache_file)
    return measured


def run_table(record_name: str, record_root: str, runs, common: dict, prefix: str = 'table_',
              random_draws: int = 0) -> list[dict]:
    """Run (or read) every defense of ``runs`` on ``record_name``; one row per run, with the random
    control of ``random_draws`` draws for every pruning defense."""
    folder = record_folder(record_root, record_name)
    record = load_attack_record(folder)
    device = resolve_device(common.get('device', 'auto'))
    splits: dict = {}   # the test sets, read once, when a control first needs them
    rows = [{'defense': 'none (the record)', **record['metrics']}]
    for save_as, defense, options in runs:
        out = folder / 'defense' / f'{prefix}{save_as}'
        config = {'yaml_path': str(CONFIG / defense / 'cifar10.yaml'), 'result_file': record_name,
                  'record_root': record_root, 'save_folder_name': out.name} | common | options
        if not (out / DEFENSE_RESULT).exists():
            same = identical_run(folder, defense_identity(defense, config))
            if same is not None:
                print(f'{record_name} {save_as}: the finished run {same.name} has the same options; read from there')
                out = same
            else:
                started = time.time()
                run_defense(defense, config | {'resume': (out / 'log.txt').exists()})
                print(f'{record_name} {save_as}: {time.time() - started:.0f} s', flush=True)
        result = load_torch(out / DEFENSE_RESULT, 'defense record')
        summary = json.loads((out / 'summary.json').read_text())
        overlap = summary.get('overlap', {})
        row = {'defense': save_as, **result['metrics'], 'seconds': summary.get('seconds'),
               'pruned': overlap.get('total'), 'with_oracle': overlap.get('with_oracle'),
               'random_expected': overlap.get('random_expected_with_oracle'),
               'pruning_alone': result.get('metrics_after_pruning')}
        if random_draws and row['pruning_alone'] is not None:
            row['random_pruning_alone'] = cached_random_control(folder, out, record, result, splits, device, random_draws)
        rows.append(row)
    return rows


def mean_sd(values: list[float]) -> str:
    """Percentages as 'mean ± sd' (sd over the draws; one draw: the value alone)."""
    values = [100 * v for v in values]
    return f'{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}' if len(values) > 1 else f'{values[0]:.1f}'


def markdown(record_name: str, attack: str, rows: list[dict]) -> str:
    lines = [f'### {record_name} ({attack})', '',
             '| defense | ACC | ASR | RA | DER | seconds | channels pruned | of them trigger-excited (random: expected) '
             '| pruning alone: ACC / ASR | random channels at its counts, pruning alone: ACC / ASR |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        der = f"{r['der']:.3f}" if 'der' in r else ''
        overlap = (f"{r['with_oracle']} ({r['random_expected']})" if r.get('pruned') else '')
        alone = (f"{100 * r['pruning_alone']['acc']:.2f} / {100 * r['pruning_alone']['asr']:.2f}"
                 if r.get('pruning_alone') else '')
        control = r.get('random_pruning_alone')
        control = f"{mean_sd(control['acc'])} / {mean_sd(control['asr'])}" if control else ''
        lines.append(f"| {r['defense']} | {100 * r['acc']:.2f} | {100 * r['asr']:.2f} | {100 * r['ra']:.2f} | {der} | "
                     f"{r.get('seconds') or '':} | {r.get('pruned') if r.get('pruned') is not None else ''} | {overlap} "
                     f"| {alone} | {control} |")
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--records', nargs='+', required=True)
    parser.add_argument('--record_root', default=str(REPO_ROOT / 'record'))
    parser.add_argument('--ratio', type=float, default=0.1, help='clean share every defense gets (FMP\'s 0.1)')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--random_draws', type=positive_int, default=3,
                        help='seeded draws of the random control at each pruning defense\'s counts')
    parser.add_argument('--out', default=str(REPO_ROOT / 'record' / 'defense_table.md'))
    args = parser.parse_args(argv)
    sections = []
    for name in args.records:
        record = load_attack_record(record_folder(args.record_root, name))
        rows = run_table(name, args.record_root, defense_runs(), {'ratio': args.ratio, 'device': args.device},
                         random_draws=args.random_draws)
        sections.append(markdown(name, record['attack'], rows))
        save_text('\n\n'.join(sections) + '\n', Path(args.out))
    print('\n\n'.join(sections))


if __name__ == '__main__':
    sys.exit(run_main(main))
