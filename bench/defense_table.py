"""Every defense on the same attack records, with the same clean data: one table per record.

For each record and each defense of the registry that has a ``config/defense/<name>/cifar10.yaml``
(plus FMP's random-selection control at FMP's per-layer counts), the defense runs with its YAML as
shipped and ``--ratio`` (default 0.1, FMP's), so every defense sees the same seeded, class-balanced
clean images. The table gives ACC, ASR, RA, DER, wall time and, for the pruning defenses, how many
of the channels each pruned are among the channels the trigger excites most at the same counts
(beside the number random choice would give in expectation). Runs whose defense record exists are
read, not rerun, so a killed table resumes.

    python bench/defense_table.py --records badnet_cifar10 blended_cifar10 sig_cifar10 wanet_cifar10
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import argparse
import json
import time

from utils import REPO_ROOT
from utils.config import run_main
from utils.defense import defense_identity, run_defense
from utils.record import DEFENSE_RESULT, load_attack_record, load_torch, record_folder, save_text
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


def run_table(record_name: str, record_root: str, runs, common: dict, prefix: str = 'table_') -> list[dict]:
    """Run (or read) every defense of ``runs`` on ``record_name``; one row per run."""
    folder = record_folder(record_root, record_name)
    record = load_attack_record(folder)
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
        rows.append({'defense': save_as, **result['metrics'], 'seconds': summary.get('seconds'),
                     'pruned': overlap.get('total'), 'with_oracle': overlap.get('with_oracle'),
                     'random_expected': overlap.get('random_expected_with_oracle')})
    return rows


def markdown(record_name: str, attack: str, rows: list[dict]) -> str:
    lines = [f'### {record_name} ({attack})', '',
             '| defense | ACC | ASR | RA | DER | seconds | channels pruned | of them trigger-excited (random: expected) |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        der = f"{r['der']:.3f}" if 'der' in r else ''
        overlap = (f"{r['with_oracle']} ({r['random_expected']})" if r.get('pruned') else '')
        lines.append(f"| {r['defense']} | {100 * r['acc']:.2f} | {100 * r['asr']:.2f} | {100 * r['ra']:.2f} | {der} | "
                     f"{r.get('seconds') or '':} | {r.get('pruned') if r.get('pruned') is not None else ''} | {overlap} |")
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--records', nargs='+', required=True)
    parser.add_argument('--record_root', default=str(REPO_ROOT / 'record'))
    parser.add_argument('--ratio', type=float, default=0.1, help='clean share every defense gets (FMP\'s 0.1)')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--out', default=str(REPO_ROOT / 'record' / 'defense_table.md'))
    args = parser.parse_args(argv)
    sections = []
    for name in args.records:
        record = load_attack_record(record_folder(args.record_root, name))
        rows = run_table(name, args.record_root, defense_runs(), {'ratio': args.ratio, 'device': args.device})
        sections.append(markdown(name, record['attack'], rows))
        save_text('\n\n'.join(sections) + '\n', Path(args.out))
    print('\n\n'.join(sections))


if __name__ == '__main__':
    sys.exit(run_main(main))
