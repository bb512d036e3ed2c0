"""Records that cannot lie: resume, overwrite, concurrent runs and reruns never leave a folder whose
files describe another run than its weights; bad input is one line, exit code 2, nothing written.
Each case runs the scripts as a user would (subprocesses, a tiny MLP on 1% of CIFAR-10)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import CIFAR10_DIR, ONE_LINE_ERROR, REPO_ROOT, describe, run_script, script_env, snapshot

ATTACK = './attack/badnet_attack.py'
FT = './defense/ft/ft.py'
TINY = ['--model', 'mlp', '--train_fraction', '0.01', '--test_fraction', '0.01', '--batch_size', '64',
        '--augment', 'false', '--device', 'cpu', '--dataset_path', str(CIFAR10_DIR)]


def attack(root, name='rec', *extra, epochs=1):
    return run_script([ATTACK, '--yaml_path', '../config/attack/badnet/cifar10.yaml', '--save_folder_name', name,
                       '--record_root', root, '--epochs', epochs, *TINY, *map(str, extra)], timeout=300)


def defend(root, name='rec', *extra, script=FT, yaml_path='./config/defense/ft/cifar10.yaml', cwd=REPO_ROOT):
    return run_script([script, '--yaml_path', yaml_path, '--result_file', name, '--record_root', root,
                       '--device', 'cpu', '--epochs', '1', '--ratio', '0.2', *map(str, extra)], cwd=cwd, timeout=300)


def ok(proc):
    assert proc.returncode == 0, describe(proc)
    return proc


def refused(proc, *fragments):
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith('warning:')]
    assert proc.returncode == 2 and len(lines) == 1 and ONE_LINE_ERROR.match(lines[0]), describe(proc)
    assert 'Traceback' not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


# --------------------------------------------------------------------------- 1. --resume with other options
@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """A finished 2-epoch record (cosine schedule) and its FT defense."""
    root = tmp_path_factory.mktemp('finished')
    ok(attack(root, 'rec', epochs=2))
    ok(defend(root))
    return root


@pytest.mark.parametrize('extra, named', [(('--pratio', '0'), 'pratio'), (('--model', 'resnet20'), 'model'),
                                          (('--patch_size', '5'), 'patch_size')])
def test_resume_with_other_options_is_refused_naming_them(finished, extra, named):
    before = snapshot(finished)
    message = refused(attack(finished, 'rec', '--resume', *extra, epochs=2), '--resume with other options', named)
    assert 'resume with the same options' in message
    assert snapshot(finished) == before


def test_extending_epochs_under_a_cosine_schedule_is_refused(finished):
    before = snapshot(finished)
    refused(attack(finished, 'rec', '--resume', epochs=4), 'cannot extend epochs from 2 to 4', 'CosineAnnealingLR')
    assert snapshot(finished) == before


def test_extending_epochs_under_a_constant_schedule_trains_the_new_epochs(tmp_path):
    ok(attack(tmp_path, 'rec', '--lr_scheduler', 'none', epochs=1))
    first = load(tmp_path / 'rec' / 'checkpoint.pt')
    ok(attack(tmp_path, 'rec', '--lr_scheduler', 'none', '--resume', epochs=3))
    rows = (tmp_path / 'rec' / 'metrics.csv').read_text().splitlines()[1:]
    assert [row.split(',')[0] for row in rows] == ['1', '2', '3']
    assert all(float(row.split(',')[1]) == 0.01 for row in rows)        # the lr stayed the recipe's
    assert yaml.safe_load((tmp_path / 'rec' / 'config.yaml').read_text())['epochs'] == 3
    assert not torch.equal(load(tmp_path / 'rec' / 'attack_result.pt')['model']['linear.weight'],
                           first['model']['linear.weight'])


def test_a_defense_resumed_with_other_options_is_refused(finished):
    before = snapshot(finished)
    refused(defend(finished, 'rec', '--resume', '--lr', '0.05'), '--resume with other options', 'lr')
    assert snapshot(finished) == before


def test_fmp_resumed_with_another_prune_exponent_is_refused(badnet_record):
    args = ('--rank_only', '--n_rank', '2', '--save_folder_name', 'resume_check', '--dataset_path', CIFAR10_DIR)
    feature = dict(script='./defense/feature.py', yaml_path='./config/defense/feature/cifar10.yaml')
    ok(defend(badnet_record, 'badnet_small', *args, **feature))
    before = snapshot(badnet_record / 'badnet_small')
    refused(defend(badnet_record, 'badnet_small', *args, '--resume', '--prune_exponent', '3', **feature),
            'prune_exponent 6 -> 3')
    assert snapshot(badnet_record / 'badnet_small') == before


# --------------------------------------------------------------------------- 2. --overwrite replaces everything, atomically
def test_overwrite_replaces_the_whole_record_defenses_included(tmp_path):
    ok(attack(tmp_path, 'rec'))
    ok(defend(tmp_path))
    assert (tmp_path / 'rec' / 'defense' / 'ft' / 'checkpoint.pt').exists()
    ok(attack(tmp_path, 'rec', '--overwrite', '--pratio', '0.2'))
    assert not (tmp_path / 'rec' / 'defense').exists()
    record = load(tmp_path / 'rec' / 'attack_result.pt')
    assert record['attack_config']['pratio'] == 0.2 == yaml.safe_load((tmp_path / 'rec' / 'config.yaml').read_text())['pratio']
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('.rec')) == ['.rec.lock']   # no staging left
    ok(defend(tmp_path, 'rec', '--resume'))          # nothing to resume: a fresh fine-tune of the new model
    assert load(tmp_path / 'rec' / 'defense' / 'ft' / 'defense_result.pt')['metrics_before'] == record['metrics']


def wait_for(path, process, timeout=120):
    started = time.time()
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() - started < timeout, f'{path} never appeared'
        time.sleep(0.2)


def start_attack(root, name, *extra, epochs=200):
    return subprocess.Popen([sys.executable, ATTACK, '--yaml_path', '../config/attack/badnet/cifar10.yaml',
                             '--save_folder_name', name, '--record_root', str(root), '--epochs', str(epochs), *TINY,
                             *map(str, extra)], cwd=REPO_ROOT, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_killed_overwrite_leaves_the_old_record_whole_and_usable(tmp_path):
    ok(attack(tmp_path, 'rec'))
    before = snapshot(tmp_path / 'rec')
    process = start_attack(tmp_path, 'rec', '--overwrite', '--pratio', '0.3')
    wait_for(tmp_path / '.rec.overwrite' / 'checkpoint.pt', process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert snapshot(tmp_path / 'rec') == before
    ok(defend(tmp_path))                               # the old record still checks out
    ok(attack(tmp_path, 'rec', '--overwrite', '--pratio', '0.3'))
    assert load(tmp_path / 'rec' / 'attack_result.pt')['attack_config']['pratio'] == 0.3
    assert not (tmp_path / '.rec.overwrite').exists() and not (tmp_path / 'rec' / 'defense').exists()


# --------------------------------------------------------------------------- 3. one run per folder
def test_two_runs_on_one_folder_at_once_one_is_refused(tmp_path):
    first = start_attack(tmp_path, 'rec', epochs=150)
    wait_for(tmp_path / 'rec' / 'run.json', first)
    second = attack(tmp_path, 'rec', epochs=150)
    message = refused(second)
    assert f'process {first.pid}' in message or 'already holds' in message
    resumed = attack(tmp_path, 'rec', '--resume', epochs=150)    # a --resume while the original runs
    assert f'process {first.pid}' in refused(resumed, 'in use')
    first.send_signal(signal.SIGKILL)
    first.communicate()
    ok(attack(tmp_path, 'rec', '--overwrite'))                  # the lock died with its process


def test_two_attacks_started_together_leave_one_consistent_record(tmp_path):
    runs = [start_attack(tmp_path, 'rec', '--pratio', pratio, epochs=3) for pratio in ('0.1', '0.2')]
    outcomes = [(run.wait(timeout=300), run.communicate()) for run in runs]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    loser = next(err for code, (_, err) in outcomes if code == 2)
    assert 'Traceback' not in loser
    config = yaml.safe_load((tmp_path / 'rec' / 'config.yaml').read_text())
    record = load(tmp_path / 'rec' / 'attack_result.pt')
    assert record['attack_config'] == config
    log = (tmp_path / 'rec' / 'log.txt').read_text()
    assert log.count('badnet on cifar10') == 1                 # one run's log, not two interleaved


# --------------------------------------------------------------------------- 4. a defense rerun into its folder
def test_a_defense_rerun_into_its_folder_needs_resume_or_overwrite(finished):
    before = snapshot(finished)
    refused(defend(finished), 'already holds', '--overwrite')
    assert snapshot(finished) == before
    ok(defend(finished, 'rec', '--overwrite', '--lr', '0.02'))
    folder = finished / 'rec' / 'defense' / 'ft'
    assert yaml.safe_load((folder / 'config.yaml').read_text())['lr'] == 0.02
    assert load(folder / 'checkpoint.pt')['rows'][0]['lr'] == 0.02
    assert (folder / 'log.txt').read_text().count('ft on rec') == 1


def test_a_defense_refuses_a_modified_record_and_names_it(tmp_path):
    ok(attack(tmp_path, 'rec'))
    path = tmp_path / 'rec' / 'attack_result.pt'
    record = load(path)
    record['metrics']['asr'] = 0.0
    torch.save(record, path)                                  # a hand edit after the run
    refused(defend(tmp_path), str(path), 'modified or truncated')
    assert not (tmp_path / 'rec' / 'defense').exists()


# --------------------------------------------------------------------------- 5. one line where tracebacks were
@pytest.mark.parametrize('device', ['mps', 'xpu', 'meta', 'cuda:x'])
def test_unsupported_devices_are_one_line_and_write_nothing(tmp_path, device):
    refused(attack(tmp_path / 'records', 'rec', '--device', device), 'unsupported device')
    assert not (tmp_path / 'records').exists()


def test_a_record_root_that_is_a_file_or_cannot_be_made(tmp_path):
    (tmp_path / 'file').write_text('not a folder')
    refused(attack(tmp_path / 'file'), 'is not a folder')
    refused(attack(tmp_path / 'file' / 'below'), 'cannot be created')
    assert (tmp_path / 'file').read_text() == 'not a folder'


@pytest.mark.parametrize('damage, message', [
    (lambda r: r['bd_test'].update({k: v[:0] for k, v in r['bd_test'].items()}), 'bd_test is empty'),
    (lambda r: r.update(model=[1, 2]), 'model is not a state dict'),
    (lambda r: r['attack_config'].pop('dataset_path'), 'lacks dataset_path'),
    (lambda r: r['bd_test'].update(images=r['bd_test']['images'][:3]), 'different lengths'),
])
def test_records_with_wrong_contents_are_one_line(tmp_path, finished, damage, message):
    shutil.copytree(finished / 'rec', tmp_path / 'rec', ignore=shutil.ignore_patterns('defense'))
    path = tmp_path / 'rec' / 'attack_result.pt'
    record = load(path)
    damage(record)
    torch.save(record, path)
    summary = json.loads((tmp_path / 'rec' / 'summary.json').read_text())
    from utils.runs import sha256_file
    summary['sha256'] = sha256_file(path)                     # consistent hash: the contents are what is wrong
    (tmp_path / 'rec' / 'summary.json').write_text(json.dumps(summary))
    refused(defend(tmp_path), 'is malformed', message)


# --------------------------------------------------------------------------- 6. smaller
def test_temporary_files_of_a_killed_save_are_removed_by_the_next_run(tmp_path):
    ok(attack(tmp_path, 'rec', '--lr_scheduler', 'none'))
    stale = tmp_path / 'rec' / '.attack_result.pt.abc123.tmp'
    stale.write_bytes(b'half a file')
    ok(attack(tmp_path, 'rec', '--lr_scheduler', 'none', '--resume', epochs=2))
    assert not stale.exists()


@pytest.mark.parametrize('extra, message', [(('--lr', 'inf'), '--lr'), (('--lr', 'nan'), '--lr'),
                                            (('--save_folder_name', ''), 'must not be empty')])
def test_small_bad_values(tmp_path, extra, message):
    refused(attack(tmp_path / 'records', 'rec', *extra), message)
    assert not (tmp_path / 'records').exists()


def test_an_attack_of_zero_epochs_is_refused(tmp_path):
    refused(attack(tmp_path / 'records', epochs=0), 'at least one epoch')
    assert not (tmp_path / 'records').exists()


def test_output_piped_into_head_does_not_stop_training(tmp_path):
    command = ' '.join([sys.executable, ATTACK, '--yaml_path', '../config/attack/badnet/cifar10.yaml',
                        '--save_folder_name', 'rec', '--record_root', str(tmp_path), '--epochs', '3', *TINY])
    proc = subprocess.run(f'{command} | head -n 1; exit ${{PIPESTATUS[0]}}', shell=True, executable='/bin/bash',
                          cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, describe(proc)
    assert len(proc.stdout.splitlines()) == 1 and (tmp_path / 'rec' / 'attack_result.pt').exists()
    assert 'badnet epoch 3/3' in (tmp_path / 'rec' / 'log.txt').read_text()


def test_the_defense_readme_command_works_from_outside_the_repository(finished, tmp_path):
    ok(defend(finished, 'rec', '--save_folder_name', 'elsewhere', script=REPO_ROOT / 'defense' / 'ft' / 'ft.py',
              cwd=tmp_path))


class Pickled:
    pass


def test_error_wording(tmp_path):
    (tmp_path / 'rec').mkdir()
    torch.save([1, 2], tmp_path / 'rec' / 'attack_result.pt')
    refused(defend(tmp_path), 'is not an attack record')
    torch.save({'x': Pickled()}, tmp_path / 'rec' / 'attack_result.pt')
    message = refused(defend(tmp_path), 'Python objects', 'refused')
    assert 'weights_only' not in message


def test_resume_compares_a_file_option_by_its_bytes_not_its_path(tmp_path):
    """A trigger image read from another checkout (same bytes, other path) is the same run; a file
    with other bytes at the recorded path's name is not."""
    from utils import UserError
    from utils.runs import RUN_FILE, RunFolder
    first, moved, other = tmp_path / 'a' / 'trigger.png', tmp_path / 'b' / 'trigger.png', tmp_path / 'c' / 'trigger.png'
    for path, content in ((first, b'pattern'), (moved, b'pattern'), (other, b'another')):
        path.parent.mkdir()
        path.write_bytes(content)
    folder = tmp_path / 'rec'
    folder.mkdir()
    (folder / RUN_FILE).write_text(json.dumps({'identity': {'lr': 0.01, 'image': str(first)}}))

    def resume(image):
        RunFolder(folder, what='the record', results=('r.pt',), resume=True, overwrite=False).check_resume(
            {'lr': 0.01, 'image': str(image)})

    resume(first)
    resume(moved)
    with pytest.raises(UserError, match='image'):
        resume(other)
