"""The scripts as a user runs them: the README's attack + defense on a CIFAR-10 subset, and bad
input (exit code 2, one line on stderr, nothing already saved touched)."""
from __future__ import annotations

import re
import shutil

import pytest
import torch

from conftest import ONE_LINE_ERROR, describe, rebuild_model, run_script, script_env, snapshot
from utils.record import ATTACK_RESULT, DEFENSE_RESULT

ATTACK = './attack/badnet_attack.py'
DEFENSE = './defense/ft/ft.py'


# --------------------------------------------------------------------------- end to end
def test_attack_learns_the_backdoor(attack_run, reload_splits):
    record = torch.load(attack_run.folder / ATTACK_RESULT, weights_only=True)
    metrics = record['metrics']
    assert metrics['asr'] >= 0.7, metrics
    assert metrics['acc'] >= 0.2, metrics                      # chance is 0.1
    # the trigger, not a bias towards the target class, makes the model answer the target
    _, test = reload_splits(record['attack_config'])
    model = rebuild_model(record).eval()
    with torch.no_grad():
        clean_preds = model(test.images[record['bd_test']['index']].float() / 255).argmax(1)
    clean_target_rate = (clean_preds == record['attack_config']['attack_target']).float().mean().item()
    assert metrics['asr'] - clean_target_rate >= 0.5, (metrics, clean_target_rate)
    # the script prints its result table
    assert re.search(r'ACC\s+ASR\s+RA', attack_run.proc.stdout)
    assert f'saved {attack_run.folder / ATTACK_RESULT}' in attack_run.proc.stdout


def test_defense_runs_on_the_attack_record(defense_run):
    record = torch.load(defense_run.folder / DEFENSE_RESULT, weights_only=True)
    assert record['metrics_before']['asr'] >= 0.7
    assert record['metrics']['acc'] >= 0.2, record['metrics']
    assert re.search(r'before \(record\).*\n.*after ft', defense_run.proc.stdout)
    assert re.search(r'ACC\s+ASR\s+RA\s+DER', defense_run.proc.stdout)


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope='module')
def saved(tmp_path_factory, attack_run):
    """A copy of the session's attack record, named ``victim``, in a record root of its own."""
    root = tmp_path_factory.mktemp('saved')
    shutil.copytree(attack_run.folder, root / 'victim')
    for name in ('truncated', 'garbage'):
        shutil.copytree(attack_run.folder, root / name)
    data = (root / 'truncated' / ATTACK_RESULT).read_bytes()
    (root / 'truncated' / ATTACK_RESULT).write_bytes(data[:len(data) // 2])
    (root / 'garbage' / ATTACK_RESULT).write_bytes(b'PK\x03\x04 this is not a torch file' * 50)
    return root


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, describe(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, describe(proc)
    assert ONE_LINE_ERROR.match(lines[0]), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def run_bad(saved, args, *fragments, env=None):
    before = snapshot(saved)
    proc = run_script(args, env=env, timeout=120)
    assert_one_line_error(proc, *fragments)
    assert snapshot(saved) == before, 'a rejected command changed what was already saved'
    return proc


def attack_args(saved, cifar10_dir, *extra):
    """An attack that would replace the ``victim`` record (--overwrite) if it got that far."""
    return [ATTACK, '--record_root', saved, '--save_folder_name', 'victim', '--overwrite', '--device', 'cpu',
            '--dataset_path', cifar10_dir, '--model', 'mlp', '--epochs', '1', '--train_fraction', '0.01',
            '--test_fraction', '0.01', *extra]


def defense_args(saved, result_file, *extra):
    return [DEFENSE, '--result_file', result_file, '--yaml_path', './config/defense/ft/cifar10.yaml',
            '--record_root', saved, '--device', 'cpu', '--epochs', '1', *extra]


def test_missing_yaml(saved, cifar10_dir, tmp_path):
    run_bad(saved, attack_args(saved, cifar10_dir, '--yaml_path', tmp_path / 'absent.yaml'),
            'not found', str(tmp_path / 'absent.yaml'))


def test_malformed_yaml(saved, cifar10_dir, tmp_path):
    (tmp_path / 'bad.yaml').write_text('base_yaml: ../config/attack/prototype/cifar10.yaml\nepochs: [1, 2\n')
    run_bad(saved, attack_args(saved, cifar10_dir, '--yaml_path', tmp_path / 'bad.yaml'), 'malformed', 'bad.yaml')


def test_unknown_yaml_key(saved, cifar10_dir, tmp_path):
    (tmp_path / 'typo.yaml').write_text('epochs: 1\npatch_sise: 4\n')
    run_bad(saved, attack_args(saved, cifar10_dir, '--yaml_path', tmp_path / 'typo.yaml'), "'patch_sise'", 'typo.yaml')


def test_wrong_type_in_yaml(saved, cifar10_dir, tmp_path):
    (tmp_path / 'type.yaml').write_text('epochs: 2.5\n')
    run_bad(saved, attack_args(saved, cifar10_dir, '--yaml_path', tmp_path / 'type.yaml'), 'epochs', 'type.yaml')


@pytest.mark.parametrize('extra, fragment', [
    (['--epochs', 'two'], '--epochs'),
    (['--attack_label_trans', 'all2some'], '--attack_label_trans'),
    (['--dataset', 'imagenet'], '--dataset'),
    (['--yaml_path'], '--yaml_path'),
])
def test_command_line_errors(saved, cifar10_dir, extra, fragment):
    run_bad(saved, attack_args(saved, cifar10_dir, *extra), fragment)


@pytest.mark.parametrize('pratio', ['1.5', '-0.1'])
def test_pratio_outside_0_1(saved, cifar10_dir, pratio):
    run_bad(saved, attack_args(saved, cifar10_dir, '--pratio', pratio), 'pratio', pratio)


@pytest.mark.parametrize('target', ['10', '-1'])
def test_target_outside_the_classes(saved, cifar10_dir, target):
    run_bad(saved, attack_args(saved, cifar10_dir, '--attack_target', target), 'attack_target')


def test_dataset_path_without_data(saved, cifar10_dir, tmp_path):
    """No data and no way to download it: torchvision's download fails at once (no network here;
    the unreachable proxy makes that so on any machine) and the error says where it looked."""
    empty = tmp_path / 'empty'
    empty.mkdir()
    offline = script_env(http_proxy='http://127.0.0.1:9', https_proxy='http://127.0.0.1:9',
                         HTTP_PROXY='http://127.0.0.1:9', HTTPS_PROXY='http://127.0.0.1:9', no_proxy='', NO_PROXY='')
    args = attack_args(saved, cifar10_dir, '--dataset_path', empty)
    run_bad(saved, args, 'not found', str(empty), env=offline)


def test_existing_record_is_not_replaced_without_overwrite(saved, cifar10_dir):
    args = [a for a in attack_args(saved, cifar10_dir) if a != '--overwrite']
    run_bad(saved, args, 'already holds', '--overwrite')


def test_missing_result_file_option(saved):
    run_bad(saved, [DEFENSE, '--record_root', saved, '--device', 'cpu'], '--result_file')


def test_result_file_without_record(saved):
    run_bad(saved, defense_args(saved, 'nothing_here'), 'nothing_here', 'not found')


def test_record_from_another_dataset(saved):
    run_bad(saved, defense_args(saved, 'victim', '--dataset', 'cifar100'), 'cifar10', 'cifar100')


def test_record_with_another_model(saved):
    run_bad(saved, defense_args(saved, 'victim', '--model', 'preactresnet18'), 'mlp', 'preactresnet18')


@pytest.mark.parametrize('name', ['truncated', 'garbage'])
def test_corrupted_attack_record(saved, name):
    run_bad(saved, defense_args(saved, name), str(saved / name / ATTACK_RESULT), 'unreadable')


def test_defense_ratio_outside_0_1(saved):
    run_bad(saved, defense_args(saved, 'victim', '--ratio', '1.5'), 'ratio')


def test_record_name_that_is_a_path(saved):
    run_bad(saved, defense_args(saved, '../victim'), 'invalid record name')


def test_defense_folder_name_that_is_a_path(saved):
    run_bad(saved, defense_args(saved, 'victim', '--save_folder_name', '../../elsewhere'), 'invalid record name')


def test_bad_input_on_an_existing_defense_record_keeps_it(saved, cifar10_dir):
    """A defense record already saved survives a defense run that is rejected."""
    folder = saved / 'victim' / 'defense' / 'ft'
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEFENSE_RESULT).write_bytes(b'an earlier defense result')
    run_bad(saved, defense_args(saved, 'victim', '--epochs', '-1'), 'epochs')
    assert (folder / DEFENSE_RESULT).read_bytes() == b'an earlier defense result'
