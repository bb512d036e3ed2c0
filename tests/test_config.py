"""YAML + command-line configuration: defaults, overrides, layering, type checks, path resolution."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CIFAR10_DIR, E2E_NAME, REPO_ROOT
from utils import UserError
from utils.config import (ToolkitParser, add_common_arguments, config_to_dict, parse_config, path_arg,
                          resolve_device, resolve_path, seed_everything, str2bool)
from utils.train import add_training_arguments


def make_parser(script_dir: Path) -> ToolkitParser:
    """A script's parser as the attacks build theirs, with its script living in ``script_dir``."""
    parser = ToolkitParser(prog='script.py', script_file=str(script_dir / 'script.py'))
    add_common_arguments(parser)
    add_training_arguments(parser)
    parser.add_argument('--dataset_path', type=path_arg, default=None)
    parser.add_argument('--mode', default='fast', choices=('fast', 'slow'))
    return parser


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """tmp/scripts (the script's folder) and tmp/work (the current directory)."""
    tmp_path = tmp_path.resolve()
    scripts, work = tmp_path / 'scripts', tmp_path / 'work'
    scripts.mkdir()
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path, scripts, work


# --------------------------------------------------------------------------- defaults and overrides
def test_yaml_sets_defaults_and_command_line_overrides(layout):
    root, scripts, _ = layout
    cfg = write(root / 'cfg.yaml', 'epochs: 7\nlr: 0.5\nlr_scheduler: MultiStepLR\nsteplr_milestones: [2, 4]\n'
                                   'amp: false\nmode: slow\n')
    args = parse_config(make_parser(scripts), ['--yaml_path', str(cfg), '--epochs', '3'])
    assert args.epochs == 3                      # command line wins
    assert args.lr == 0.5 and isinstance(args.lr, float)
    assert args.lr_scheduler == 'MultiStepLR'
    assert args.steplr_milestones == [2, 4]
    assert args.amp is False
    assert args.mode == 'slow'
    assert args.batch_size == 128                # untouched parser default

    # the command line wins wherever --yaml_path stands
    args = parse_config(make_parser(scripts), ['--mode', 'fast', '--yaml_path', str(cfg)])
    assert args.mode == 'fast' and args.epochs == 7


def test_without_yaml_parser_defaults_apply(layout):
    _, scripts, _ = layout
    args = parse_config(make_parser(scripts), [])
    assert (args.epochs, args.lr, args.mode, args.yaml_path) == (100, 0.01, 'fast', None)


def test_yaml_values_are_converted_by_the_option_type(layout):
    root, scripts, _ = layout
    cfg = write(root / 'cfg.yaml', 'lr: 1\nrandom_seed: 5\namp: yes\nwd: 1.0e-3\n')
    args = parse_config(make_parser(scripts), ['--yaml_path', str(cfg)])
    assert args.lr == 1.0 and isinstance(args.lr, float)
    assert args.random_seed == 5 and args.amp is True and args.wd == pytest.approx(1e-3)


def test_scalar_yaml_value_for_a_list_option_becomes_a_list(layout):
    """``steplr_milestones: 3`` means the one milestone 3, as ``--steplr_milestones 3`` does."""
    root, scripts, _ = layout
    cfg = write(root / 'cfg.yaml', 'steplr_milestones: 3\n')
    from_yaml = parse_config(make_parser(scripts), ['--yaml_path', str(cfg)])
    from_cli = parse_config(make_parser(scripts), ['--steplr_milestones', '3'])
    assert from_cli.steplr_milestones == [3]
    assert from_yaml.steplr_milestones == [3]


# --------------------------------------------------------------------------- base_yaml layering
def test_base_yaml_layers_relative_to_the_including_file(layout):
    root, scripts, _ = layout
    write(root / 'recipes' / 'grand.yaml', 'epochs: 1\nlr: 0.3\nwd: 0.1\nbatch_size: 16\n')
    write(root / 'recipes' / 'base.yaml', 'base_yaml: grand.yaml\nepochs: 5\nlr: 0.2\n')
    child = write(root / 'attacks' / 'child.yaml', 'base_yaml: ../recipes/base.yaml\nepochs: 9\n')
    args = parse_config(make_parser(scripts), ['--yaml_path', str(child), '--batch_size', '32'])
    assert (args.epochs, args.lr, args.wd, args.batch_size) == (9, 0.2, 0.1, 32)


def test_base_yaml_that_includes_itself_is_an_error(layout):
    root, scripts, _ = layout
    write(root / 'a.yaml', 'base_yaml: b.yaml\nepochs: 1\n')
    write(root / 'b.yaml', 'base_yaml: a.yaml\nepochs: 2\n')
    with pytest.raises(UserError, match='includes itself'):
        parse_config(make_parser(scripts), ['--yaml_path', str(root / 'a.yaml')])


def test_missing_base_yaml_is_named(layout):
    root, scripts, _ = layout
    cfg = write(root / 'cfg.yaml', 'base_yaml: nowhere/base.yaml\n')
    with pytest.raises(UserError) as info:
        parse_config(make_parser(scripts), ['--yaml_path', str(cfg)])
    assert 'not found' in str(info.value) and str(root / 'nowhere' / 'base.yaml') in str(info.value)


# --------------------------------------------------------------------------- errors
def test_unknown_key_names_key_and_file(layout):
    root, scripts, _ = layout
    cfg = write(root / 'cfg.yaml', 'epochs: 2\nepochz: 3\n')
    with pytest.raises(UserError) as info:
        parse_config(make_parser(scripts), ['--yaml_path', str(cfg)])
    assert "'epochz'" in str(info.value) and str(cfg) in str(info.value)


def test_unknown_key_in_a_base_names_the_base_file(layout):
    root, scripts, _ = layout
    base = write(root / 'base.yaml', 'colour: red\n')
    child = write(root / 'child.yaml', 'base_yaml: base.yaml\nepochs: 2\n')
    with pytest.raises(UserError) as info:
        parse_config(make_parser(scripts), ['--yaml_path', str(child)])
    assert "'colour'" in str(info.value) and str(base) in str(info.value)


@pytest.mark.parametrize('text', ['epochs: [1, 2\n', 'epochs: 1\n  lr: 2\n', 'a: b: c\n', '\tepochs: 1\n'])
def test_malformed_yaml(layout, text):
    root, scripts, _ = layout
    cfg = write(root / 'cfg.yaml', text)
    with pytest.raises(UserError) as info:
        parse_config(make_parser(scripts), ['--yaml_path', str(cfg)])
    assert 'malformed' in str(info.value) and str(cfg) in str(info.value)


def test_yaml_that_is_not_a_mapping(layout):
    root, scripts, _ = layout
    cfg = write(root / 'cfg.yaml', '- epochs\n- 3\n')
    with pytest.raises(UserError, match='mapping'):
        parse_config(make_parser(scripts), ['--yaml_path', str(cfg)])


def test_empty_yaml_changes_nothing(layout):
    root, scripts, _ = layout
    cfg = write(root / 'cfg.yaml', '# nothing here\n')
    assert parse_config(make_parser(scripts), ['--yaml_path', str(cfg)]).epochs == 100


def test_missing_yaml(layout):
    _, scripts, work = layout
    with pytest.raises(UserError) as info:
        parse_config(make_parser(scripts), ['--yaml_path', 'absent.yaml'])
    assert 'not found' in str(info.value) and str(work / 'absent.yaml') in str(info.value)


@pytest.mark.parametrize('key, value', [
    ('epochs', '2.5'), ('epochs', 'abc'), ('epochs', 'true'), ('batch_size', '[64, 128]'),
    ('lr', 'fast'), ('amp', 'maybe'), ('random_seed', '1.0'), ('steplr_milestones', '[1, x]'),
])
def test_wrong_type_in_yaml(layout, key, value):
    root, scripts, _ = layout
    cfg = write(root / 'cfg.yaml', f'{key}: {value}\n')
    with pytest.raises(UserError) as info:
        parse_config(make_parser(scripts), ['--yaml_path', str(cfg)])
    assert key in str(info.value) and str(cfg) in str(info.value)


def test_empty_value_for_a_numeric_option_is_an_error(layout):
    """``epochs:`` with nothing after it is a typo, not "no epochs": reject it while parsing
    rather than failing later with a TypeError."""
    root, scripts, _ = layout
    cfg = write(root / 'cfg.yaml', 'epochs:\n')
    with pytest.raises(UserError) as info:
        parse_config(make_parser(scripts), ['--yaml_path', str(cfg)])
    assert 'epochs' in str(info.value)


def test_null_is_fine_for_an_option_whose_default_is_none(layout):
    root, scripts, _ = layout
    cfg = write(root / 'cfg.yaml', 'dataset_path: null\n')
    assert parse_config(make_parser(scripts), ['--yaml_path', str(cfg)]).dataset_path is None


@pytest.mark.parametrize('text', ['lr_scheduler: Cosine\n', 'mode: medium\n'])
def test_choices_are_checked_in_yaml(layout, text):
    root, scripts, _ = layout
    cfg = write(root / 'cfg.yaml', text)
    with pytest.raises(UserError, match='choose from'):
        parse_config(make_parser(scripts), ['--yaml_path', str(cfg)])


@pytest.mark.parametrize('argv', [['--lr_scheduler', 'Cosine'], ['--epochs', '2.5'], ['--epochs'], ['--bogus', '1']])
def test_command_line_errors_exit_2_with_one_line(layout, capsys, argv):
    _, scripts, _ = layout
    with pytest.raises(SystemExit) as info:
        parse_config(make_parser(scripts), argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('script.py: error:')


def test_str2bool():
    assert [str2bool(v) for v in ('true', 'Yes', '1', 'on')] == [True] * 4
    assert [str2bool(v) for v in ('false', 'NO', '0', 'off')] == [False] * 4
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool('maybe')


# --------------------------------------------------------------------------- path resolution
def test_resolve_path_prefers_cwd_then_script_folder(layout):
    _, scripts, work = layout
    (work / 'both').mkdir()
    (scripts / 'both').mkdir()
    (scripts / 'script_only').mkdir()
    (work / 'cwd_only').mkdir()
    assert resolve_path('both', scripts) == str(work / 'both')
    assert resolve_path('cwd_only', scripts) == str(work / 'cwd_only')
    assert resolve_path('script_only', scripts) == str(scripts / 'script_only')
    assert resolve_path('nowhere', scripts) == str(work / 'nowhere')
    assert resolve_path('script_only', None) == str(work / 'script_only')
    assert resolve_path('/abs/path', scripts) == '/abs/path'
    assert resolve_path(None, scripts) is None and resolve_path('', scripts) == ''


def test_path_options_resolve_from_command_line_and_yaml(layout):
    root, scripts, work = layout
    (scripts / 'data_beside_script').mkdir()
    (work / 'data_here').mkdir()
    parser = make_parser(scripts)
    assert parse_config(parser, ['--dataset_path', 'data_here']).dataset_path == str(work / 'data_here')
    parser = make_parser(scripts)
    assert parse_config(parser, ['--dataset_path', 'data_beside_script']).dataset_path == str(scripts / 'data_beside_script')
    cfg = write(root / 'cfg.yaml', 'dataset_path: data_beside_script\nrecord_root: out\n')
    args = parse_config(make_parser(scripts), ['--yaml_path', str(cfg)])
    assert args.dataset_path == str(scripts / 'data_beside_script')
    assert args.record_root == str(work / 'out')      # exists nowhere: the current directory
    assert args.yaml_path == str(cfg)


def test_yaml_path_resolves_against_the_script_folder(tmp_path, monkeypatch):
    """The README's ``python ./attack/x.py --yaml_path ../config/x.yaml`` run from the repository root."""
    repo = tmp_path.resolve() / 'repo'
    scripts = repo / 'attack'
    scripts.mkdir(parents=True)
    cfg = write(repo / 'config' / 'x.yaml', 'epochs: 4\n')
    monkeypatch.chdir(repo)
    assert not (repo / '..' / 'config' / 'x.yaml').exists()
    args = parse_config(make_parser(scripts), ['--yaml_path', '../config/x.yaml'])
    assert args.epochs == 4 and args.yaml_path == str(cfg)


def test_yaml_path_without_a_value_is_a_one_line_error(layout, capsys):
    _, scripts, _ = layout
    with pytest.raises(SystemExit) as info:
        parse_config(make_parser(scripts), ['--yaml_path'])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('script.py: error:'), err


def test_yaml_path_in_cwd_wins_over_the_script_folder(layout):
    _, scripts, work = layout
    write(work / 'x.yaml', 'epochs: 11\n')
    write(scripts / 'x.yaml', 'epochs: 22\n')
    assert parse_config(make_parser(scripts), ['--yaml_path', 'x.yaml']).epochs == 11


def test_config_to_dict_keeps_plain_values_only(layout):
    _, scripts, _ = layout
    args = parse_config(make_parser(scripts), ['--epochs', '2'])
    args.device_object = torch.device('cpu')
    data = config_to_dict(args)
    assert data['epochs'] == 2 and 'device_object' not in data
    assert yaml.safe_load(yaml.safe_dump(data)) == data


# --------------------------------------------------------------------------- devices and seeds
def test_resolve_device():
    assert resolve_device('cpu') == torch.device('cpu')
    assert resolve_device('auto').type == ('cuda' if torch.cuda.is_available() else 'cpu')
    with pytest.raises(UserError):
        resolve_device('abacus')
    with pytest.raises(UserError):
        resolve_device('cuda:99')


def test_seed_everything_is_reproducible():
    import random
    import numpy as np
    seed_everything(3)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    seed_everything(4)
    assert torch.rand(1).item() != first[2]


# --------------------------------------------------------------------------- the record's config.yaml
def test_resolved_config_is_saved_in_the_record(attack_run):
    config = yaml.safe_load((attack_run.folder / 'config.yaml').read_text())
    record = torch.load(attack_run.folder / 'attack_result.pt', weights_only=True)
    assert config == record['attack_config']
    assert config['yaml_path'] == str(REPO_ROOT / 'config' / 'attack' / 'badnet' / 'cifar10.yaml')
    # absolute, and the same folder (the path is kept as given, so a symlinked ../shared stays as it is)
    assert Path(config['dataset_path']).is_absolute()
    assert Path(config['dataset_path']).resolve() == CIFAR10_DIR.resolve()
    assert config['record_root'] == str(attack_run.record_root)
    assert config['save_folder_name'] == E2E_NAME
    # command line
    assert (config['model'], config['epochs'], config['lr'], config['augment']) == ('mlp', 3, 0.02, False)
    # the attack's YAML and, through base_yaml, the prototype recipe
    assert (config['patch_size'], config['patch_position'], config['patch_value']) == (3, 'bottom_right', 255)
    assert (config['wd'], config['lr_scheduler'], config['pratio']) == (0.0005, 'CosineAnnealingLR', 0.1)
    assert config['attack'] == 'badnet'
