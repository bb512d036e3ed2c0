"""The FMP paper's CIFAR-10 comparison (Huang & Bu, ICLR 2024, Table 1), with one command, for a GPU:
PreAct-ResNet18 trained 100 epochs by BackdoorBench's recipe (``config/attack/prototype/cifar10.yaml``)
under each of the paper's attacks, then every defense of the registry with its CIFAR-10 YAML as
shipped (FMP with its released settings), and FMP's random-selection control at the same
per-layer counts, each on the same record (``bench/defense_table.py``).

    python bench/paper_table1.py                       # the full recipe (hours on one GPU)
    python bench/paper_table1.py --epochs 20           # a shortened recipe, said so in the table

Attacks the toolkit does not have yet are listed and skipped. Every step is skipped when its
record exists, so a killed run resumes; the table goes to ``record/paper_table1_<epochs>ep.md``.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import argparse

from bench.defense_table import SMOKE, defense_runs, markdown, run_table
from utils import REPO_ROOT
from utils.attack import run_attack
from utils.config import run_main
from utils.record import ATTACK_RESULT, save_text
from utils.registry import ATTACKS

PAPER_ATTACKS = ('badnet', 'blended', 'sig', 'wanet', 'lf', 'ssba', 'inputaware')   # the paper's Table 1 rows
CONFIG = REPO_ROOT / 'config'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', type=int, default=100, help='attack training epochs (the paper: 100)')
    parser.add_argument('--record_root', default=str(REPO_ROOT / 'record'))
    parser.add_argument('--dataset_path', default=str(REPO_ROOT / 'data'))
    parser.add_argument('--device', default='auto')
    parser.add_argument('--attacks', nargs='*', default=PAPER_ATTACKS)
    parser.add_argument('--smoke', action='store_true',
                        help='check the pipeline in minutes: ResNet-20, 2%% of the data, defenses cut short (no figures)')
    args = parser.parse_args(argv)
    smoke_attack = {'model': 'resnet20', 'train_fraction': 0.02, 'test_fraction': 0.02} if args.smoke else {}
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
        rows = run_table(name, args.record_root, defense_runs(SMOKE if args.smoke else None), {'device': args.device},
                         prefix='')
        tables.append(markdown(name, attack, rows))
    recipe = 'the paper\'s recipe' if args.epochs == 100 else f'a shortened recipe: {args.epochs} of the paper\'s 100 epochs'
    if args.smoke:
        recipe = 'SMOKE CHECK of the pipeline: ResNet-20 on 2% of the data, no meaningful figures'
    text = (f'# FMP paper, Table 1 setting (CIFAR-10, PreAct-ResNet18, {recipe})\n\n'
            + (f'Not in this toolkit yet: {", ".join(missing)}\n\n' if missing else '')
            + '\n\n'.join(tables) + '\n')
    path = Path(args.record_root) / f'paper_table1_{args.epochs}ep{"_smoke" if args.smoke else ""}.md'
    save_text(text, path)
    print(text)
    print(f'wrote {path}')


if __name__ == '__main__':
    sys.exit(run_main(main))
