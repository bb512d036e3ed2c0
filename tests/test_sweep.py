"""The sweep runner: a small grid runs, is killed midway and resumed, and its results hold exactly the
expected rows; submitit's local executor runs the same grid; bad sweeps are refused before anything
runs; a record that no longer verifies is rerun; the report rebuilds from the records alone."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CIFAR10_DIR, ONE_LINE_ERROR, REPO_ROOT, describe, script_env

# 2 attacks x 2 defenses x 2 settings on a tiny MLP: 2 attack steps and 8 defense steps
SMALL = {
    'name': 'small',
    'datasets': ['cifar10'], 'models': ['mlp'], 'seeds': [0],
    'recipe': {'epochs': 1, 'train_fraction': 0.01, 'test_fraction': 0.01, 'batch_size': 64, 'augment': False,
               'device': 'cpu', 'dataset_path': str(CIFAR10_DIR)},
    'defense_recipe': {'epochs': 1, 'ratio': 0.5, 'device': 'cpu'},
    'attacks': {'badnet': {}, 'blended': {'attack_trigger_img_path': ''}},
    'defenses': {'ft': {'lr': [0.01, 0.02]}, 'fp': {'acc_ratio': [0.1, 0.3]}},
    'workers': 2,
}
EXPECTED_FOLDERS = {'ft_lr-0p01', 'ft_lr-0p02', 'fp_acc_ratio-0p1', 'fp_acc_ratio-0p3'}


def write_sweep(folder: Path, **changes) -> Path:
    path = folder / 'sweep.yaml'
    path.write_text(yaml.safe_dump(SMALL | changes))
    return path


def sweep(yaml_path, root, *extra, wait=True):
    command = [sys.executable, 'sweep.py', '--yaml_path', str(yaml_path), '--record_root', str(root), *map(str, extra)]
    if not wait:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=script_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True, timeout=600)


def results(root, name='small'):
    with open(root / 'sweeps' / name / 'results.csv') as handle:
        return list(csv.DictReader(handle))


def finished_defenses(root):
    """The defense results whose run finished: its summary.json (with the result's hash) is written
    after defense_result.pt, so a run killed between the two has a result but has not finished."""
    return [p for p in root.glob('*/defense/*/defense_result.pt') if (p.parent / 'summary.json').exists()]


def check_results(root):
    rows = results(root)
    assert len(rows) == 2 + 2 * 4, rows
    keys = sorted((r['record'], r['defense'], r['setting']) for r in rows)
    assert len(set(keys)) == len(keys)
    for record in ('badnet_cifar10_mlp_s0', 'blended_cifar10_mlp_s0'):
        mine = [r for r in rows if r['record'] == record]
        assert sorted(r['defense'] for r in mine) == ['fp', 'fp', 'ft', 'ft', 'none']
        assert {json.loads(r['setting'])['lr'] for r in mine if r['defense'] == 'ft'} == {0.01, 0.02}
        assert all(0 <= float(r['acc']) <= 1 for r in mine)
        assert sorted(p.name for p in (root / record / 'defense').iterdir() if not p.name.startswith('.')) == \
            sorted(EXPECTED_FOLDERS)
    table = (root / 'sweeps' / 'small' / 'results.md').read_text()
    assert '### badnet' in table and '### blended' in table and 'Partial' not in table
    for plot in ('acc_vs_asr.png', 'bars.png', 'curves_badnet_cifar10_mlp_s0.png'):
        assert (root / 'sweeps' / 'small' / plot).stat().st_size > 1000, plot


def test_a_sweep_killed_midway_resumes_and_reports_exactly_the_expected_rows(tmp_path):
    path = write_sweep(tmp_path)
    root = tmp_path / 'record'
    running = sweep(path, root, wait=False)
    deadline = time.time() + 300
    while not finished_defenses(root):     # an attack and a defense have finished
        assert running.poll() is None, running.communicate()
        assert time.time() < deadline
        time.sleep(0.3)
    running.send_signal(signal.SIGKILL)
    running.communicate()
    finished_before = {p.parent.name for p in finished_defenses(root)}
    partial = subprocess.run([sys.executable, '-m', 'utils.report', str(root / 'sweeps' / 'small')], cwd=REPO_ROOT,
                             env=script_env(), capture_output=True, text=True, timeout=300)
    assert partial.returncode == 0, describe(partial)
    assert 'of 10 steps of this sweep have finished' in (root / 'sweeps' / 'small' / 'results.md').read_text()
    stamps = {p: p.stat().st_mtime_ns for p in finished_defenses(root)}   # a step killed mid-save is rerun, rightly
    resumed = sweep(path, root)
    assert resumed.returncode == 0, describe(resumed)
    assert '10 of 10 steps done' in resumed.stdout
    assert '[10/10] done' in resumed.stdout   # a line per finished step, though the bar is off without a terminal
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items()), 'finished steps were rerun'
    assert finished_before <= {p.parent.name for p in root.glob('*/defense/*/defense_result.pt')} == EXPECTED_FOLDERS
    check_results(root)
    # a third run has nothing left to do
    again = sweep(path, root)
    assert again.returncode == 0 and '10 of 10 steps done' in again.stdout
    # the report rebuilds from the records alone
    (root / 'sweeps' / 'small' / 'results.csv').unlink()
    rebuilt = subprocess.run([sys.executable, '-m', 'utils.report', str(root / 'sweeps' / 'small')], cwd=REPO_ROOT,
                             env=script_env(), capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0, describe(rebuilt)
    check_results(root)


def test_the_submitit_local_executor_runs_the_same_sweep(tmp_path):
    path = write_sweep(tmp_path)
    root = tmp_path / 'record'
    proc = sweep(path, root, '--launcher', 'local')
    assert proc.returncode == 0, describe(proc)
    check_results(root)
    assert list((root / 'sweeps' / 'small' / 'logs' / 'submitit').glob('*_result.pkl'))


def test_a_record_that_no_longer_verifies_is_rerun_with_its_defenses(tmp_path):
    path = write_sweep(tmp_path, attacks={'badnet': {}}, defenses={'ft': {}})
    root = tmp_path / 'record'
    from utils.sweep import step_states
    assert [state for _, state in step_states(path, root)] == ['run', 'run']
    assert sweep(path, root).returncode == 0
    assert [state for _, state in step_states(path, root)] == ['done', 'done']
    record = root / 'badnet_cifar10_mlp_s0' / 'attack_result.pt'
    tampered = torch.load(record, weights_only=True)
    tampered['metrics']['asr'] = 0.0
    torch.save(tampered, record)
    listed = sweep(path, root, '--dry_run')                # says what it would do, does nothing
    assert listed.returncode == 0 and 'rerun   attack:badnet_cifar10_mlp_s0' in listed.stdout, describe(listed)
    assert '2 steps: 0 running, 0 done' in listed.stdout and torch.load(record, weights_only=True)['metrics']['asr'] == 0.0
    proc = sweep(path, root)
    assert proc.returncode == 0 and '2 of 2 steps done' in proc.stdout, describe(proc)
    from utils.runs import check_record_hash
    check_record_hash(record.parent)                 # consistent again: the attack was rerun, then its defense
    assert (root / 'badnet_cifar10_mlp_s0' / 'defense' / 'ft' / 'defense_result.pt').exists()
    from utils.runs import FolderLock
    with FolderLock(root / '.badnet_cifar10_mlp_s0.lock', 'the record'):   # as a run of that record holds it
        assert [state for _, state in step_states(path, root)] == ['running', 'done']
    assert [state for _, state in step_states(path, root)] == ['done', 'done']


def test_how_a_step_ran_is_not_what_it_computed(tmp_path):
    """Options that say how to run (device, torch.compile, ...) do not make a finished step rerun,
    also when its record predates the option; an option of the recipe does."""
    from utils.sweep import _same_run, expected_options, load_sweep, plan
    attack_step = plan(load_sweep(write_sweep(tmp_path, attacks={'badnet': {}}, defenses={'ft': {}})), tmp_path)[0]
    stored = expected_options(attack_step)
    assert _same_run(stored, attack_step)
    assert _same_run({k: v for k, v in stored.items() if k != 'compile'}, attack_step)      # written before --compile
    assert _same_run(stored | {'compile': 'reduce-overhead', 'device': 'cuda'}, attack_step)
    assert not _same_run(stored | {'lr': stored['lr'] * 2}, attack_step)
    # a file option read from another checkout: the same bytes are the same run, other bytes are not
    mask = tmp_path / 'mask.npy'
    mask.write_bytes(b'mask')
    step = dataclasses.replace(attack_step, config=attack_step.config | {'patch_mask_path': str(mask)})
    elsewhere = tmp_path / 'other_checkout' / 'mask.npy'
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b'mask')
    assert _same_run(expected_options(step) | {'patch_mask_path': str(elsewhere)}, step)
    elsewhere.write_bytes(b'another mask')
    assert not _same_run(expected_options(step) | {'patch_mask_path': str(elsewhere)}, step)


def test_a_failed_step_is_listed_with_its_log_and_the_sweep_exits_1(tmp_path):
    """A step that fails when it runs (here FP's holdout share leaves no clean image to hold out) does not
    stop the sweep; it is listed at the end with its log, and the exit code says so."""
    path = write_sweep(tmp_path, attacks={'badnet': {}}, defenses={'fp': {'holdout': 0.001}})
    proc = sweep(path, tmp_path / 'record')
    assert proc.returncode == 1, describe(proc)
    assert '1 of 2 steps done' in proc.stdout and 'failed: defense:badnet_cifar10_mlp_s0/fp (log: ' in proc.stdout


@pytest.mark.parametrize('change, message', [
    ({'attacks': {'badnett': {}}}, "unknown attack 'badnett'"),
    ({'defenses': {'fmp': {}}}, "unknown defense 'fmp'"),
    ({'models': ['resnet21']}, "unknown model 'resnet21'"),
    ({'datasets': ['imagenet']}, "unknown dataset 'imagenet'"),
    ({'defenses': {'ft': {'lr': -1}}}, 'lr'),
    ({'attacks': {'badnet': {'patch_sise': 3}}}, "unknown key 'patch_sise'"),
    ({'colour': 'blue'}, "unknown key 'colour'"),
])
def test_a_bad_sweep_is_refused_before_anything_runs(tmp_path, change, message):
    from utils import UserError
    from utils.sweep import run_sweep
    root = tmp_path / 'record'
    with pytest.raises(UserError, match=message) as error:
        run_sweep(write_sweep(tmp_path, **change), root)
    assert '\n' not in str(error.value) and ('known' in str(error.value) or 'valid' in str(error.value) or message == 'lr')
    assert not root.exists()


def test_a_bad_sweep_through_the_script_is_one_line(tmp_path):
    proc = sweep(write_sweep(tmp_path, attacks={'badnett': {}}), tmp_path / 'record')
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith('warning:')]
    assert proc.returncode == 2 and len(lines) == 1 and ONE_LINE_ERROR.match(lines[0]), describe(proc)
    assert "unknown attack 'badnett'" in lines[0] and 'badnet' in lines[0].split('known:')[1]


def test_two_sweeps_of_one_name_do_not_collide(tmp_path):
    path = write_sweep(tmp_path, recipe=SMALL['recipe'] | {'epochs': 30})
    root = tmp_path / 'record'
    first = sweep(path, root, wait=False)
    deadline = time.time() + 120
    while not (root / 'sweeps' / 'small' / 'steps.json').exists():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.2)
    second = sweep(path, root)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    lines = [line for line in second.stderr.strip().splitlines() if not line.startswith('warning:')]
    assert second.returncode == 2 and len(lines) == 1 and 'in use by process' in lines[0], describe(second)


@pytest.mark.parametrize('path', sorted((REPO_ROOT / 'config' / 'sweep').glob('*.yaml')), ids=lambda p: p.stem)
def test_every_shipped_sweep_plans(path, tmp_path):
    from utils.sweep import load_sweep, plan
    sweep = load_sweep(path)
    steps = plan(sweep, tmp_path)
    attacks = [s for s in steps if s.kind == 'attack']
    assert len(attacks) == len(sweep['attacks']) * len(sweep['models']) * len(sweep['seeds'])
    # a list in a defense's options is an axis (no shipped sweep gives an option that takes a list)
    raw = yaml.safe_load(path.read_text())['defenses']
    settings = sum(math.prod(len(v) for v in options.values() if isinstance(v, list)) for options in raw.values())
    assert len(steps) - len(attacks) == len(attacks) * settings


def test_an_archived_sweep_resumes_on_an_empty_disk_and_trains_only_what_a_missing_step_needs(tmp_path):
    """The archive keeps every verified step's text files, no weights. On a new disk the archive alone
    settles the sweep; with one archived defense gone, its attack is trained again (the same record,
    by SHA-256, from the same seed) and only that defense runs."""
    archive = tmp_path / 'archive'
    path = write_sweep(tmp_path, attacks={'badnet': {}}, defenses={'ft': {'lr': [0.01, 0.02]}}, archive=str(archive))
    first_root, record = tmp_path / 'first', 'badnet_cifar10_mlp_s0'
    proc = sweep(path, first_root)
    assert proc.returncode == 0 and '3 of 3 steps done;' in proc.stdout, describe(proc)
    kept = archive / 'records' / record
    assert {p.name for p in (kept / 'defense').iterdir()} == {'ft_lr-0p01', 'ft_lr-0p02'}
    assert not list(archive.rglob('*.pt')) and (kept / 'archived.json').exists() and (kept / 'metrics.csv').exists()
    with open(archive / 'results.csv') as handle:
        archived_rows = list(csv.DictReader(handle))
    assert sorted(r['defense'] for r in archived_rows) == ['ft', 'ft', 'none'] and results(first_root) == archived_rows

    from utils.sweep import step_states
    new_root = tmp_path / 'second'                   # a new disk: no record, only the archive
    assert [state for _, state in step_states(path, new_root)] == ['archived'] * 3
    proc = sweep(path, new_root)
    assert proc.returncode == 0 and '3 of 3 steps done (3 from the archive)' in proc.stdout, describe(proc)
    assert not (new_root / record).exists() and results(new_root) == archived_rows

    shutil.rmtree(kept / 'defense' / 'ft_lr-0p02')   # one step missing: its attack must exist again to run it
    assert [state for _, state in step_states(path, new_root)] == ['run', 'archived', 'run']
    proc = sweep(path, new_root)
    assert proc.returncode == 0 and '3 of 3 steps done (1 from the archive)' in proc.stdout, describe(proc)
    assert [p.parent.name for p in new_root.glob('*/defense/*/defense_result.pt')] == ['ft_lr-0p02']
    assert (kept / 'defense' / 'ft_lr-0p02' / 'archived.json').exists()
    def figures(rows):   # every column but the time a step took
        return sorted(str({k: v for k, v in r.items() if k != 'seconds'}) for r in rows)
    assert figures(results(new_root)) == figures(archived_rows)   # the same record, the same figures row for row

    # the archive's report rebuilds from the archive alone
    (archive / 'results.csv').unlink()
    rebuilt = subprocess.run([sys.executable, '-m', 'utils.report', str(archive)], cwd=REPO_ROOT, env=script_env(),
                             capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0 and '3 rows' in rebuilt.stdout, describe(rebuilt)


def test_an_attack_trained_on_another_records_model_waits_for_it():
    from utils.sweep import load_sweep, plan
    steps = {s.key: s for s in plan(load_sweep(REPO_ROOT / 'config' / 'sweep' / 'cifar10_cpu.yaml'), REPO_ROOT / 'record')}
    assert steps['attack:lf_cifar10'].depends == 'attack:clean_cifar10'
    assert steps['attack:badnet_cifar10'].depends is None


def test_a_record_digest_covers_batchnorm_state_and_not_the_folder(tmp_path):
    """The archive names an attack record by its tensors: a BatchNorm model's state dict (with its 0-dim
    ``num_batches_tracked``) must digest, the same in any folder, and differently once a weight moves."""
    from models import build_model
    from utils.archive import record_digest
    state = build_model('resnet20', 10, (3, 32, 32)).state_dict()
    assert any(t.dim() == 0 for t in state.values())
    paths = []
    for name in ('a', 'b'):
        (tmp_path / name).mkdir()
        torch.save({'model': state, 'attack_config': {'record_root': str(tmp_path / name)}}, tmp_path / name / 'r.pt')
        paths.append(tmp_path / name / 'r.pt')
    assert record_digest(paths[0]) == record_digest(paths[1])
    moved = {k: v + 1 if k == 'conv1.weight' else v for k, v in state.items()}
    torch.save({'model': moved}, tmp_path / 'moved.pt')
    assert record_digest(tmp_path / 'moved.pt') != record_digest(paths[0])


def test_a_step_that_cannot_be_archived_is_reported_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """A failing copy into the archive (a full disk, a bug) must not stop the steps that are running."""
    import utils.sweep as sweep_module
    archive = tmp_path / 'archive'
    path = write_sweep(tmp_path, attacks={'badnet': {}}, defenses={'ft': {'lr': 0.01}}, archive=str(archive))
    keep = sweep_module.keep_in_archive

    def broken_for_attacks(step, record_root, archive_folder):
        if step.kind == 'attack':
            raise OSError('no space left on device')
        keep(step, record_root, archive_folder)

    monkeypatch.setattr(sweep_module, 'keep_in_archive', broken_for_attacks)
    outcome = sweep_module.run_sweep(path, tmp_path / 'record', report=False)
    assert outcome['done'] == 2 and not outcome['failed'] and not outcome['skipped']
    assert outcome['not_archived'] == {'attack:badnet_cifar10_mlp_s0': 'OSError: no space left on device'}
    assert (archive / 'records' / 'badnet_cifar10_mlp_s0' / 'defense' / 'ft' / 'archived.json').exists()
    assert not (archive / 'records' / 'badnet_cifar10_mlp_s0' / 'archived.json').exists()
    # the archive's plan is written as the sweep starts, report or not: a sweep still running can be reported
    assert len(json.loads((archive / 'steps.json').read_text())['steps']) == 2


def test_a_running_sweep_keeps_its_report_and_its_archives_current(tmp_path, monkeypatch):
    """A sweep killed after a step leaves tables that hold that step (here rebuilt after every step)."""
    import utils.report as report_module
    import utils.sweep as sweep_module
    archive = tmp_path / 'archive'
    path = write_sweep(tmp_path, attacks={'badnet': {}}, defenses={'ft': {'lr': [0.01, 0.02]}}, archive=str(archive))
    monkeypatch.setattr(sweep_module, 'REPORT_EVERY_S', 0)
    first_lines: list[tuple[str, str]] = []
    write_report = report_module.write_report

    def spy(folder, *args):
        rows = write_report(folder, *args)
        first_lines.append((Path(folder).name, (Path(folder) / 'results.md').read_text().splitlines()[0]))
        return rows

    monkeypatch.setattr(report_module, 'write_report', spy)
    outcome = sweep_module.run_sweep(path, tmp_path / 'record')
    assert outcome['done'] == 3 and not outcome['failed']
    # after the attack, before its defenses could start: the sweep's table and the archive's, one row each
    assert first_lines[:2] == [('small', '**Partial: 1 of 3 steps of this sweep have finished.** Records with steps '
                                         'to run (finished of all, the attack included): badnet_cifar10_mlp_s0 (1 of 3).'),
                               ('archive', first_lines[0][1])]
    assert not first_lines[-1][1].startswith('**Partial') and first_lines[-1][0] == 'archive'
