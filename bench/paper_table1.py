"""The FMP paper's CIFAR-10 comparison (Huang & Bu, ICLR 2024, Table 1), with one command, for a GPU:
PreAct-ResNet18 trained 100 epochs by BackdoorBench's recipe (``config/attack/prototype/cifar10.yaml``)
under each of the paper's attacks, then FMP with its released settings (``config/defense/feature/``),
FMP's random-selection control at the same per-layer counts, and every other defense of the
registry that has a CIFAR-10 YAML, each on the same record.

    python bench/paper_table1.py                       # the full recipe (hours on one GPU)
    python bench/paper_table1.py --epochs 20           # a shortened recipe, said so in the table

Attacks the toolkit does not have yet are listed and skipped. Every step is skipped when its
record exists, so a killed run resumes; the table goes to ``record/paper_table1_<epochs>ep.md``.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import argparse

from utils import REPO_ROOT
from utils.attack import run_attack
from utils.config import run_main
from utils.defense import run_defense
from utils.record import ATTACK_RESULT, DEFENSE_RESULT, load_torch, metrics_table, save_text
from utils.registry import ATTACKS, DEFENSES

PAPER_ATTACKS = ('badnet', 'blended', 'sig', 'wanet', 'lf', 'ssba', 'inputaware')   # the paper's Table 1 rows
CONFIG = REPO_ROOT / 'config'


def defense_runs(record_root: str):
    """(folder name, defense, options) of every defense to run on a record."""
    runs = [('feature', 'feature', {}), ('feature_random', 'feature', {'select': 'random'})]
    for name in DEFENSES.names():
        if name != 'feature' and (CONFIG / 'defense' / name / 'cifar10.yaml').is_file():
            runs.append((name, name, {}))
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', type=int, default=100, help='attack training epochs (the paper: 100)')
    parser.add_argument('--record_root', default=str(REPO_ROOT / 'record'))
    parser.add_argument('--dataset_path', default=str(REPO_ROOT / 'data'))
    parser.add_argument('--device', default='auto')
    parser.add_argument('--attacks', nargs='*', default=PAPER_ATTACKS)
    parser.add_argument('--smoke', action='store_true',
                        help='check the pipeline in minutes: ResNet-20, 2%% of the data, defenses 1 epoch (no figures)')
    args = parser.parse_args(argv)
    smoke_attack = {'model': 'resnet20', 'train_fraction': 0.02, 'test_fraction': 0.02} if args.smoke else {}
    smoke_defense = {'epochs': 1} if args.smoke else {}
    available = [a for a in args.attacks if a in ATTACKS.names()]
    missing = [a for a in args.attacks if a not in available]
    if missing:
        print(f'not in this toolkit yet, skipped: {", ".join(missing)}')
    tables = []
    for attack in available:
        name = f'{attack}_cifar10_paper_{args.epochs}ep' + ('_smoke' if args.smoke else '')
        folder = Path(args.record_root) / name
        if not (folder / ATTACK_RESULT).exists():
            run_attack(attack, {'yaml_path': str(CONFIG / 'attack' / attack / 'cifar10.yaml'), 'epochs': args.epochs,
                                'dataset_path': args.dataset_path, 'record_root': args.record_root,
                                'device': args.device, 'save_folder_name': name,
                                'resume': (folder / 'checkpoint.pt').exists()} | smoke_attack)
        rows = {f'{attack} (no defense)': load_torch(folder / ATTACK_RESULT, 'attack record')['metrics']}
        for save_as, defense, options in defense_runs(args.record_root):
            out = folder / 'defense' / save_as
            if not (out / DEFENSE_RESULT).exists():
                run_defense(defense, {'yaml_path': str(CONFIG / 'defense' / defense / 'cifar10.yaml'), 'result_file': name,
                                      'record_root': args.record_root, 'device': args.device, 'save_folder_name': save_as,
                                      'resume': (out / 'checkpoint.pt').exists()} | options | smoke_defense)
            rows[f'  {save_as}'] = load_torch(out / DEFENSE_RESULT, 'defense record')['metrics']
        tables.append(metrics_table(rows))
    recipe = 'the paper\'s recipe' if args.epochs == 100 else f'a shortened recipe: {args.epochs} of the paper\'s 100 epochs'
    if args.smoke:
        recipe = 'SMOKE CHECK of the pipeline: ResNet-20 on 2% of the data, no meaningful figures'
    text = (f'# FMP paper, Table 1 setting (CIFAR-10, PreAct-ResNet18, {recipe})\n\n'
            + (f'Not in this toolkit yet: {", ".join(missing)}\n\n' if missing else '')
            + '\n\n'.join(f'```\n{t}\n```' for t in tables) + '\n')
    path = Path(args.record_root) / f'paper_table1_{args.epochs}ep{"_smoke" if args.smoke else ""}.md'
    save_text(text, path)
    print(text)
    print(f'wrote {path}')


if __name__ == '__main__':
    sys.exit(run_main(main))
