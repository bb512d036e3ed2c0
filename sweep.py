"""Run a benchmark grid: datasets x models x attacks x defenses x seeds from one YAML (utils/sweep.py).

    python sweep.py --yaml_path config/sweep/demo_cpu.yaml
    python sweep.py --yaml_path config/sweep/cifar10_cpu.yaml --workers 2
    python sweep.py --yaml_path config/sweep/paper_cifar10.yaml --launcher slurm
    python sweep.py --yaml_path config/sweep/cifar10_cpu.yaml --dry_run     # what is done, what is left

Steps whose outputs exist and verify are skipped, so rerunning a killed sweep resumes it; the table
and plots go to record/sweeps/<name>/ (rebuilt any time by ``python -m utils.report <that folder>``)."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parent))  # noqa: E702

import argparse
import json

from utils import REPO_ROOT
from utils.config import path_arg, positive_int, resolve_path, run_main
from utils.sweep import LAUNCHERS, run_step, run_sweep, step_states


def main(argv=None):
    parser = argparse.ArgumentParser(prog='sweep.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--yaml_path', type=path_arg, help='the sweep: config/sweep/<name>.yaml')
    parser.add_argument('--record_root', type=path_arg, default=str(REPO_ROOT / 'record'))
    parser.add_argument('--workers', type=positive_int, default=None, help='steps at once (default: the YAML\'s, else 1)')
    parser.add_argument('--launcher', choices=LAUNCHERS, default=None,
                        help='subprocess (default), local (submitit\'s local executor) or slurm (submitit)')
    parser.add_argument('--dry_run', action='store_true',
                        help='list every step as running, done, archived (settled by the sweep\'s archive), rerun (outputs '
                             'that do not verify), resume or run; run nothing')
    parser.add_argument('--run_step', default=None, help=argparse.SUPPRESS)   # one step, in a child process
    args = parser.parse_args(argv)
    if args.run_step:
        return run_step(json.loads(Path(args.run_step).read_text()))
    if not args.yaml_path:
        parser.error('--yaml_path is required')
    record_root = resolve_path(args.record_root, REPO_ROOT)
    if args.dry_run:
        states = step_states(Path(resolve_path(args.yaml_path, REPO_ROOT)), Path(record_root))
        for step, state in states:
            print(f'{state:<8}{step.key}')
        counts = {state: sum(1 for _, s in states if s == state) for state in ('running', 'done', 'archived', 'rerun', 'resume', 'run')}
        print(f'{len(states)} steps: ' + ', '.join(f'{n} {state}' for state, n in counts.items()))
        return 0
    outcome = run_sweep(Path(resolve_path(args.yaml_path, REPO_ROOT)), Path(record_root), args.workers, args.launcher)
    archived = f" ({outcome['from_archive']} from the archive)" if outcome['from_archive'] else ''
    print(f"{outcome['done']} of {outcome['steps']} steps done{archived}; results in {outcome['folder']}")
    for key, log in outcome['failed'].items():
        print(f'failed: {key} (log: {log})')
    for key in outcome['skipped']:
        print(f'skipped (its attack failed): {key}')
    for key, error in outcome['not_archived'].items():
        print(f'not archived: {key} ({error})')
    return 1 if outcome['failed'] or outcome['not_archived'] else 0


if __name__ == '__main__':
    sys.exit(run_main(main))
