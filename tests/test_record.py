"""Records: atomic writes, loading errors, and the attack/defense records written by the scripts."""
from __future__ import annotations

import csv
import json
import math
import os
import stat

import pytest
import torch
import yaml
from PIL import Image

from conftest import E2E_NAME, rebuild_model
from utils import UserError
from utils.evaluate import defense_effectiveness_rating, evaluate
from utils.poison import PoisonedSet
from utils.record import (ATTACK_RESULT, DEFENSE_RESULT, artefact_path, atomic_write, cached_artefact,
                          load_attack_record, load_torch, partial_path, record_folder, resumable_map, save_csv,
                          save_json, save_text, save_torch, save_yaml, tensor_digest)

CPU = torch.device('cpu')


# --------------------------------------------------------------------------- atomic writes
class WriterFailed(Exception):
    pass


def failing_writer(handle):
    handle.write(b'half of a new ')
    raise WriterFailed


@pytest.mark.parametrize('error', [WriterFailed, KeyboardInterrupt])
def test_failing_writer_leaves_the_previous_file_and_no_temp_file(tmp_path, error):
    path = tmp_path / 'file.txt'
    save_text('the previous content\n', path)

    def writer(handle):
        handle.write(b'half of a new ')
        raise error

    with pytest.raises(error):
        atomic_write(path, writer)
    assert path.read_text() == 'the previous content\n'
    assert [p.name for p in tmp_path.iterdir()] == ['file.txt']


def test_failing_writer_on_a_new_path_leaves_nothing(tmp_path):
    with pytest.raises(WriterFailed):
        atomic_write(tmp_path / 'sub' / 'new.pt', failing_writer)
    assert list((tmp_path / 'sub').iterdir()) == []


def test_failing_torch_save_keeps_the_previous_record(tmp_path):
    path = tmp_path / 'attack_result.pt'
    save_torch({'a': torch.ones(2)}, path)
    with pytest.raises(Exception):
        save_torch({'a': lambda: None}, path)          # a lambda cannot be pickled
    assert torch.equal(load_torch(path, 'test')['a'], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ['attack_result.pt']


def test_savers_round_trip(tmp_path):
    save_yaml({'b': 1, 'a': [1, 2], 'c': None}, tmp_path / 'c.yaml')
    assert yaml.safe_load((tmp_path / 'c.yaml').read_text()) == {'a': [1, 2], 'b': 1, 'c': None}
    save_json({'x': 0.5}, tmp_path / 's.json')
    assert json.loads((tmp_path / 's.json').read_text()) == {'x': 0.5}
    save_csv([{'epoch': 1, 'acc': 0.1}, {'epoch': 2, 'acc': 0.25, 'asr': 0.5}], tmp_path / 'm.csv')
    with open(tmp_path / 'm.csv') as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{'epoch': '1', 'acc': '0.1', 'asr': ''}, {'epoch': '2', 'acc': '0.25', 'asr': '0.5'}]


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Temporary files are created private (0600); the renamed file must get 0666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    save_text('x', tmp_path / 'f.txt')
    assert stat.S_IMODE((tmp_path / 'f.txt').stat().st_mode) == 0o666 & ~umask


# --------------------------------------------------------------------------- loading errors
def test_load_torch_errors(tmp_path):
    save_torch({'a': 1}, tmp_path / 'ok.pt')
    data = (tmp_path / 'ok.pt').read_bytes()
    (tmp_path / 'truncated.pt').write_bytes(data[:len(data) // 2])
    (tmp_path / 'garbage.pt').write_bytes(b'\x00garbage' * 100)
    (tmp_path / 'empty.pt').write_bytes(b'')
    torch.save([1, 2], tmp_path / 'list.pt')
    assert load_torch(tmp_path / 'ok.pt', 'thing') == {'a': 1}
    for name in ('truncated.pt', 'garbage.pt', 'empty.pt'):
        with pytest.raises(UserError, match='unreadable'):
            load_torch(tmp_path / name, 'thing')
    with pytest.raises(UserError, match='expected a dict'):
        load_torch(tmp_path / 'list.pt', 'thing')
    with pytest.raises(UserError, match='not found'):
        load_torch(tmp_path / 'absent.pt', 'thing')


def test_load_torch_refuses_arbitrary_objects(tmp_path):
    torch.save({'obj': WriterFailed()}, tmp_path / 'pickled.pt')
    with pytest.raises(UserError):
        load_torch(tmp_path / 'pickled.pt', 'thing')


def test_cached_artefact_is_built_once_per_inputs_and_rebuilt_when_unreadable(tmp_path):
    builds, log = [], []

    def build(value):
        def run():
            builds.append(value)
            return {'tensor': torch.full((3,), float(value))}
        return run

    first = cached_artefact(tmp_path, 'thing', {'seed': 1, 'eps': 0.5}, build(1), log.append)
    again = cached_artefact(tmp_path, 'thing', {'eps': 0.5, 'seed': 1}, build(2), log.append)   # key order is no input
    other = cached_artefact(tmp_path, 'thing', {'seed': 2, 'eps': 0.5}, build(3), log.append)
    assert builds == [1, 3] and torch.equal(first['tensor'], again['tensor']) and other['tensor'][0] == 3
    assert 'reusing thing' in log[1] and len(list((tmp_path / '.artefacts').iterdir())) == 2
    [path] = [p for p in (tmp_path / '.artefacts').iterdir() if load_torch(p, 'x')['inputs']['seed'] == 1]
    path.write_bytes(path.read_bytes()[:20])   # truncated: rebuilt, not an error
    assert cached_artefact(tmp_path, 'thing', {'seed': 1, 'eps': 0.5}, build(4), log.append)['tensor'][0] == 4
    assert 'rebuilding thing' in log[-2] and builds == [1, 3, 4]
    assert load_torch(path, 'x')['artefact']['tensor'][0] == 4


def test_a_killed_resumable_map_resumes_after_its_last_saved_item(tmp_path):
    progress = tmp_path / 'thing.partial.pt'
    calls = []

    def compute(item, fail_at=None):
        if item == fail_at:
            raise KeyboardInterrupt
        calls.append(item)
        return torch.tensor([item * 10])

    items = list(range(6))
    with pytest.raises(KeyboardInterrupt):
        resumable_map(lambda i: compute(i, fail_at=4), items, progress, 'test', save_every=0)
    assert [int(t) for t in load_torch(progress, 'x')['done']] == [0, 10, 20, 30]
    calls.clear()
    done = resumable_map(compute, items, progress, 'test', save_every=0)
    assert calls == [4, 5] and [int(t) for t in done] == [0, 10, 20, 30, 40, 50]
    calls.clear()   # progress of another list of items is not trusted
    assert len(resumable_map(compute, items[:3], progress, 'test')) == 3 and calls == [0, 1, 2]
    # the artefact cache removes a finished build's progress file
    progress = partial_path(artefact_path(tmp_path, 'thing', {'a': 1}))
    with pytest.raises(KeyboardInterrupt):
        resumable_map(lambda i: compute(i, fail_at=2), items, progress, 'test', save_every=0)
    assert progress.exists()
    cached_artefact(tmp_path, 'thing', {'a': 1}, lambda: {'v': torch.zeros(1)}, lambda line: None)
    assert [path.name for path in (tmp_path / '.artefacts').iterdir()] == [artefact_path(tmp_path, 'thing', {'a': 1}).name]


def test_tensor_digest_tells_values_dtypes_and_shapes_apart():
    x = torch.arange(6, dtype=torch.float32)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert len({tensor_digest(x), tensor_digest(x.reshape(2, 3)), tensor_digest(x.double()), tensor_digest(x + 1),
                tensor_digest(x, x), tensor_digest(torch.empty(0))}) == 6
    # 0-dim tensors (BatchNorm's num_batches_tracked in every state dict) digest, apart from 1-dim ones
    assert len({tensor_digest(torch.tensor(3)), tensor_digest(torch.tensor([3])), tensor_digest(torch.tensor(3.0)),
                tensor_digest(torch.tensor(4))}) == 4


def test_load_attack_record_errors(tmp_path):
    with pytest.raises(UserError, match='no record'):
        load_attack_record(tmp_path / 'absent')
    (tmp_path / 'unfinished').mkdir()
    save_torch({'epoch': 0}, tmp_path / 'unfinished' / 'checkpoint.pt')
    with pytest.raises(UserError, match='unfinished'):
        load_attack_record(tmp_path / 'unfinished')
    save_torch({'model_name': 'mlp', 'model': {}}, tmp_path / 'partial' / ATTACK_RESULT)
    with pytest.raises(UserError, match='missing .*bd_test'):
        load_attack_record(tmp_path / 'partial')


@pytest.mark.parametrize('name', ['', '.', '..', '../escape', 'a/b', '/abs'])
def test_record_folder_rejects_paths(tmp_path, name):
    with pytest.raises(UserError, match='invalid record name'):
        record_folder(tmp_path, name)


# --------------------------------------------------------------------------- the attack record
@pytest.fixture(scope='module')
def attack_record(attack_run):
    return torch.load(attack_run.folder / ATTACK_RESULT, map_location='cpu', weights_only=True)


def test_attack_record_has_every_documented_key(attack_record):
    r = attack_record
    assert {'model_name', 'num_classes', 'input_shape', 'model', 'dataset', 'attack', 'attack_config',
            'bd_train', 'bd_test', 'metrics'} <= set(r)
    assert (r['model_name'], r['num_classes'], list(r['input_shape']), r['dataset'], r['attack']) == \
        ('mlp', 10, [3, 32, 32], 'cifar10', 'badnet')
    assert set(r['bd_train']) == {'poison_index', 'images', 'original_labels', 'backdoor_labels'}
    assert set(r['bd_test']) == {'index', 'images', 'original_labels', 'backdoor_labels'}
    assert set(r['metrics']) == {'acc', 'asr', 'ra'}
    assert r['bd_train']['images'].dtype == r['bd_test']['images'].dtype == torch.uint8
    for part, key in (('bd_train', 'poison_index'), ('bd_test', 'index')):
        assert r[part][key].dtype == r[part]['original_labels'].dtype == r[part]['backdoor_labels'].dtype == torch.int64
    assert isinstance(r['attack_config'], dict)
    assert set(r['trigger']) == {'mask', 'pattern'}          # what rebuilds the BadNets trigger


def test_attack_metrics_recompute_from_the_record(attack_record, reload_splits):
    r = attack_record
    _, test = reload_splits(r['attack_config'])
    metrics = evaluate(rebuild_model(r), test, PoisonedSet.from_record(r['bd_test']), CPU)
    assert metrics == r['metrics']


def test_poisoned_sets_match_the_reloaded_clean_data(attack_record, reload_splits):
    r, config = attack_record, attack_record['attack_config']
    train, test = reload_splits(config)
    mask, pattern = r['trigger']['mask'], r['trigger']['pattern']
    target = config['attack_target']

    bd_train = r['bd_train']
    index = bd_train['poison_index']
    assert len(index) == round(config['pratio'] * len(train)) == 500
    assert torch.equal(bd_train['original_labels'], train.labels[index])
    assert not (bd_train['original_labels'] == target).any() and (bd_train['backdoor_labels'] == target).all()
    assert torch.equal(bd_train['images'], torch.where(mask, pattern, train.images[index]))

    bd_test = r['bd_test']
    assert torch.equal(bd_test['index'], torch.nonzero(test.labels != target).flatten())
    assert torch.equal(bd_test['original_labels'], test.labels[bd_test['index']])
    assert torch.equal(bd_test['images'], torch.where(mask, pattern, test.images[bd_test['index']]))
    # BadNets' 3x3 white patch, bottom right
    assert mask.sum() == 9 and mask[0, 29:, 29:].all() and (pattern == 255).all()


def test_attack_record_files(attack_run, attack_record):
    folder = attack_run.folder
    for name in ('config.yaml', 'metrics.csv', 'summary.json', 'log.txt', 'preview.png', ATTACK_RESULT):
        assert (folder / name).is_file(), name
    assert not [p.name for p in folder.iterdir() if p.name.endswith('.tmp')]

    with open(folder / 'metrics.csv') as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row['epoch']) for row in rows] == [1, 2, 3]
    assert {'epoch', 'train_loss', 'acc', 'asr', 'ra', 'seconds'} <= set(rows[0])
    assert {k: float(rows[-1][k]) for k in ('acc', 'asr', 'ra')} == attack_record['metrics']

    summary = json.loads((folder / 'summary.json').read_text())
    assert summary['metrics'] == attack_record['metrics']
    assert (summary['attack'], summary['dataset'], summary['model'], summary['epochs']) == ('badnet', 'cifar10', 'mlp', 3)

    log = (folder / 'log.txt').read_text()
    assert 'badnet epoch 3/3' in log and f'saved {folder / ATTACK_RESULT}' in log

    with Image.open(folder / 'preview.png') as preview:
        assert preview.format == 'PNG' and preview.size == (8 * 34 + 2, 2 * 34 + 2)


# --------------------------------------------------------------------------- the defense record
@pytest.fixture(scope='module')
def defense_record(defense_run):
    return torch.load(defense_run.folder / DEFENSE_RESULT, map_location='cpu', weights_only=True)


def test_defense_record_files_and_keys(defense_run, defense_record, attack_record):
    folder = defense_run.folder
    for name in ('config.yaml', 'metrics.csv', 'summary.json', 'log.txt', DEFENSE_RESULT):
        assert (folder / name).is_file(), name
    r = defense_record
    assert {'model', 'metrics'} <= set(r) and set(r['metrics']) == {'acc', 'asr', 'ra', 'der'}
    assert (r['model_name'], r['dataset'], r['attack'], r['defense']) == ('mlp', 'cifar10', 'badnet', 'ft')
    assert r['metrics_before'] == attack_record['metrics']        # same model, same test sets
    assert r['metrics']['der'] == defense_effectiveness_rating(r['metrics_before'], r['metrics'])
    assert 0 <= r['metrics']['der'] <= 1
    # fine-tuning changed the weights
    assert not torch.equal(r['model']['linear.weight'], attack_record['model']['linear.weight'])

    config = yaml.safe_load((folder / 'config.yaml').read_text())
    assert config == r['defense_config']
    assert (config['defense'], config['result_file'], config['epochs'], config['ratio']) == ('ft', E2E_NAME, 2, 0.2)
    assert (config['batch_size'], config['min_lr']) == (256, 0.0001)          # from the defense YAML
    with open(folder / 'metrics.csv') as handle:
        assert [int(row['epoch']) for row in csv.DictReader(handle)] == [1, 2]
    summary = json.loads((folder / 'summary.json').read_text())
    assert summary['after'] == r['metrics'] and summary['before'] == r['metrics_before']
    assert 'saved' in (folder / 'log.txt').read_text()


def test_defense_metrics_recompute_from_the_record(defense_record, attack_record, reload_splits):
    _, test = reload_splits(attack_record['attack_config'])
    metrics = evaluate(rebuild_model(defense_record), test, PoisonedSet.from_record(attack_record['bd_test']), CPU)
    stored = defense_record['metrics']
    assert metrics == {k: stored[k] for k in ('acc', 'asr', 'ra')}
    assert not math.isnan(stored['der'])


def test_an_exported_copy_without_git_still_names_its_commit(tmp_path):
    """``git archive`` (how release tarballs are made) writes the commit into utils/COMMIT, so records
    made from such a copy say which code made them."""
    import subprocess
    import sys

    from conftest import REPO_ROOT
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip('not a git checkout')
    archive = subprocess.run(['git', 'archive', 'HEAD'], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    subprocess.run(['tar', '-x', '-C', str(tmp_path)], input=archive, check=True)
    version = subprocess.run([sys.executable, '-c', 'from utils.record import code_version; print(code_version())'],
                             cwd=tmp_path, capture_output=True, text=True, env={'PATH': '/usr/bin:/bin', 'GIT_CEILING_DIRECTORIES': str(tmp_path.parent)})
    assert version.returncode == 0, version.stderr
    assert len(version.stdout.strip()) >= 7 and head.startswith(version.stdout.strip())
