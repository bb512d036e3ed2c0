"""Shared fixtures: the real CIFAR-10 copy, a script runner and one small attack + defense run
through the command line (the README's commands, on a CIFAR-10 subset), made once per session."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI clones the repository into a sibling folder of `shared`, so this relative location holds there too.
# CIFAR10_DIR in the environment points elsewhere (bench/gpu_check.sh: a carried subset on a GPU machine).
CIFAR10_DIR = Path(os.environ.get('CIFAR10_DIR') or Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'cifar10')

# Two CPU cores are shared with long training runs: one thread each is much faster than
# oversubscribed threads fighting over them.
torch.set_num_threads(1)

# The README-shaped attack the session's record comes from. BadNets on an MLP learns the
# 3x3 patch within a couple of epochs on 5000 images (ASR about 0.9 over seeds 0..4 here);
# augmentation is off because random crops move the patch, which an MLP cannot follow quickly.
# a one-line error: the toolkit's 'error: ...' or argparse's '<script>: error: ...' for an option's value
ONE_LINE_ERROR = re.compile(r'^(error: |\S+: error: )\S')

E2E_NAME = 'e2e'
E2E_ATTACK_ARGS = ['--model', 'mlp', '--epochs', '3', '--train_fraction', '0.1', '--test_fraction', '0.05',
                   '--lr', '0.02', '--batch_size', '64', '--augment', 'false', '--random_seed', '0']
E2E_DEFENSE_ARGS = ['--epochs', '2', '--ratio', '0.2']


def script_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault('OMP_NUM_THREADS', '1')
    env.update(extra)
    return env


def run_script(args, cwd: Path = REPO_ROOT, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python <args>`` from the repository root, output captured as text."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env or script_env(),
                          capture_output=True, text=True, timeout=timeout)


def snapshot(root):
    """Every file under ``root`` with its bytes' digest and mtime, and every folder."""
    state = {}
    for path in sorted(root.rglob('*')):
        key = str(path.relative_to(root))
        if path.is_dir():
            state[key] = 'dir'
        else:
            stat = path.stat()
            state[key] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_size, stat.st_mtime_ns)
    return state


def describe(proc: subprocess.CompletedProcess) -> str:
    return f'exit code {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}'


def rejection(call, capsys) -> str:
    """The one line with which ``call()`` refuses its input: a UserError's message, or the
    argparse error line of a value its option's type rejects (exit code 2)."""
    from utils import UserError
    try:
        call()
    except UserError as exc:
        assert '\n' not in str(exc)
        return str(exc)
    except SystemExit as exc:
        assert exc.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]
    raise AssertionError('the input was accepted')


def rebuild_model(record: dict) -> torch.nn.Module:
    """A record's model, rebuilt from the registry with its saved weights."""
    from models import build_model
    model = build_model(record['model_name'], record['num_classes'], tuple(record['input_shape']))
    model.load_state_dict(record['model'])
    return model


@pytest.fixture(scope='session')
def cifar10_dir() -> Path:
    assert (CIFAR10_DIR / 'cifar-10-batches-py' / 'data_batch_1').is_file(), \
        f'CIFAR-10 is missing: expected the python batches under {CIFAR10_DIR / "cifar-10-batches-py"}'
    return CIFAR10_DIR


@pytest.fixture(scope='session')
def cifar10(cifar10_dir):
    """The full (train, test) splits, read once. The shared copy is pixel-exact but reordered,
    so its checksums differ from the official archive: the loader must say so with a warning."""
    from utils.data import load_dataset
    with pytest.warns(UserWarning, match='md5'):
        return load_dataset('cifar10', cifar10_dir)


@pytest.fixture
def cached_cifar(monkeypatch, cifar10):
    """In-process entry points read the session's CIFAR-10 copy from memory instead of disk."""
    import utils.data
    monkeypatch.setattr(utils.data, 'load_dataset', lambda name, path: cifar10)


def tiny_attack(name, root, save_as=None, **options):
    """``run_attack(name, ...)`` in-process with the attack's CIFAR-10 YAML on an MLP, one epoch, 2% of the data."""
    from utils.attack import run_attack
    config = {'yaml_path': str(REPO_ROOT / 'config' / 'attack' / name / 'cifar10.yaml'), 'dataset_path': str(CIFAR10_DIR),
              'model': 'mlp', 'epochs': 1, 'train_fraction': 0.02, 'test_fraction': 0.02, 'batch_size': 64,
              'record_root': str(root), 'device': 'cpu', 'save_folder_name': save_as or name}
    return run_attack(name, config | options)


@pytest.fixture
def reload_splits(monkeypatch, cifar10, cifar10_dir):
    """``utils.data.load_splits`` as a defense calls it, over the session's copy of CIFAR-10
    (the disk read is cached; the subset logic is the library's own)."""
    import utils.data

    def cached_load(name, path):
        assert name == 'cifar10'
        assert Path(path).resolve() == cifar10_dir.resolve()
        return cifar10

    monkeypatch.setattr(utils.data, 'load_dataset', cached_load)

    def reload(config: dict):
        return utils.data.load_splits(config['dataset'], config['dataset_path'], config['train_fraction'],
                                      config['test_fraction'], config['random_seed'])
    return reload


@pytest.fixture(scope='session')
def attack_run(tmp_path_factory, cifar10_dir):
    """``python ./attack/badnet_attack.py --yaml_path ../config/attack/badnet/cifar10.yaml ...`` from the
    repository root (the YAML path only resolves against the script's folder), into a tmp record root."""
    record_root = tmp_path_factory.mktemp('record')
    proc = run_script(['./attack/badnet_attack.py', '--yaml_path', '../config/attack/badnet/cifar10.yaml',
                       '--dataset', 'cifar10', '--dataset_path', cifar10_dir, '--save_folder_name', E2E_NAME,
                       *E2E_ATTACK_ARGS, '--record_root', record_root, '--device', 'cpu'])
    assert proc.returncode == 0, describe(proc)
    return SimpleNamespace(proc=proc, record_root=record_root, folder=record_root / E2E_NAME)


@pytest.fixture(scope='session')
def defense_run(attack_run):
    """``python ./defense/ft/ft.py --result_file e2e --yaml_path ./config/defense/ft/cifar10.yaml ...``"""
    proc = run_script(['./defense/ft/ft.py', '--result_file', E2E_NAME, '--yaml_path', './config/defense/ft/cifar10.yaml',
                       '--dataset', 'cifar10', *E2E_DEFENSE_ARGS, '--record_root', attack_run.record_root,
                       '--device', 'cpu'])
    assert proc.returncode == 0, describe(proc)
    return SimpleNamespace(proc=proc, folder=attack_run.folder / 'defense' / 'ft')


@pytest.fixture(scope='session')
def badnet_record(tmp_path_factory, cifar10_dir):
    """A small ResNet-20 BadNets record, ``badnet_small``, trained on a CIFAR-10 subset (shared by the
    pruning-defense tests). A 6x6 patch without augmentation: ResNet-20 learns it in 3 epochs on
    3,000 images (ASR about 0.99), a 3x3 one not."""
    root = tmp_path_factory.mktemp('fmp_records')
    result = run_script(['./attack/badnet_attack.py', '--yaml_path', '../config/attack/badnet/cifar10.yaml',
                         '--dataset', 'cifar10', '--dataset_path', cifar10_dir, '--save_folder_name', 'badnet_small',
                         '--model', 'resnet20', '--epochs', 3, '--lr', 0.05, '--batch_size', 64, '--augment', 'false',
                         '--train_fraction', 0.06, '--test_fraction', 0.05, '--pratio', 0.2, '--patch_size', 6,
                         '--record_root', root, '--device', 'cpu'], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


@pytest.fixture(scope='session')
def mlp_record(tmp_path_factory, cifar10_dir):
    """A tiny MLP BadNets record, ``mlp_small``: a model without convolutions or BatchNorm."""
    root = tmp_path_factory.mktemp('mlp_records')
    result = run_script(['./attack/badnet_attack.py', '--yaml_path', '../config/attack/badnet/cifar10.yaml',
                         '--dataset_path', cifar10_dir, '--save_folder_name', 'mlp_small', '--model', 'mlp', '--epochs', 1,
                         '--train_fraction', 0.02, '--test_fraction', 0.02, '--record_root', root, '--device', 'cpu'],
                        timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def load_bench(name: str):
    """A script of bench/ (not a package) as a module, for tests of its functions."""
    import importlib.util

    from utils import REPO_ROOT
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / 'bench' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
