"""The extension points new methods plug into: the Python entry points and registries, the
defense context's poisoned training set and fresh models, detection scoring, and attacks that
need a clean reference model. Runs in-process on CIFAR-10 subsets with tiny models."""
from __future__ import annotations

import json

import pytest
import torch

import utils.attack
import utils.data
from attack.badnet_attack import BadNet
from attack.wanet_attack import warp
from conftest import CIFAR10_DIR, REPO_ROOT, tiny_attack
from utils import UserError
from utils.attack import Attack, run_attack
from utils.defense import Defense, DefenseResult, register_defense, run_defense
from utils.record import ATTACK_RESULT, DEFENSE_RESULT, load_torch, save_torch
from utils.registry import ATTACKS, DEFENSES, register_attack


# --------------------------------------------------------------------------- registries and entry points
def test_registries_list_every_method_by_its_file():
    assert {'badnet', 'blended', 'sig', 'wanet', 'lf', 'ssba', 'inputaware', 'lira', 'lc', 'trojannn'} <= set(ATTACKS.names())
    assert {'feature', 'ft', 'fp', 'anp', 'clp', 'bnp', 'rnp'} <= set(DEFENSES.names())
    assert ATTACKS.get('badnet') is BadNet
    assert DEFENSES.script('ft') == REPO_ROOT / 'defense' / 'ft' / 'ft.py'
    with pytest.raises(UserError, match="unknown attack 'nope'.*badnet"):
        ATTACKS.get('nope')
    with pytest.raises(UserError, match="unknown defense '../ft'"):
        DEFENSES.get('../ft')


def test_entry_points_check_a_config_dict_as_yaml(tmp_path):
    with pytest.raises(UserError, match="config: unknown key 'patch_sise'"):
        run_attack('badnet', {'patch_sise': 3, 'record_root': str(tmp_path)})
    with pytest.raises(UserError, match='config: invalid value for pratio: 1.5'):
        run_attack('badnet', {'pratio': 1.5, 'record_root': str(tmp_path)})
    with pytest.raises(UserError, match='--result_file is required'):
        run_defense('ft', {'record_root': str(tmp_path)})
    with pytest.raises(UserError, match='not found'):
        run_defense('ft', {'result_file': 'absent', 'record_root': str(tmp_path)})
    assert not any(tmp_path.iterdir())


def test_run_attack_and_run_defense_write_the_records_the_scripts_write(tmp_path, cached_cifar):
    record = tiny_attack('badnet', tmp_path, pratio=0.1)
    assert record['attack'] == 'badnet' and (tmp_path / 'badnet' / ATTACK_RESULT).is_file()
    result = run_defense('ft', {'yaml_path': str(REPO_ROOT / 'config/defense/ft/cifar10.yaml'), 'result_file': 'badnet',
                                'record_root': str(tmp_path), 'device': 'cpu', 'epochs': 1, 'ratio': 0.5})
    assert set(result['metrics']) == {'acc', 'asr', 'ra', 'der'}
    assert load_torch(tmp_path / 'badnet' / 'defense' / 'ft' / DEFENSE_RESULT, 'defense record')['metrics'] == result['metrics']


# --------------------------------------------------------------------------- the defense context
@register_defense
class ProbeDefense(Defense):
    """Test double: keeps what a defense sees and flags the first half of the true poison indices."""
    name = 'probe_context'
    seen: dict = {}

    def defend(self, ctx):
        ProbeDefense.seen = {'bd_train': ctx.bd_train, 'poison_index': ctx.poison_index, 'train': ctx.train,
                             'poisoned_train': ctx.poisoned_train, 'new_model': ctx.new_model(), 'model': ctx.model}
        half = ctx.poison_index[:len(ctx.poison_index) // 2]
        return DefenseResult(flagged=half, summary={"probe": True})


def probe(root, record_name):
    return run_defense('probe_context', {'result_file': record_name, 'record_root': str(root), 'device': 'cpu'})


@pytest.mark.parametrize('attack', ['badnet', 'wanet'])
def test_a_defense_reads_the_poisoned_training_set_and_its_true_indices(tmp_path, cached_cifar, attack):
    record = tiny_attack(attack, tmp_path)
    result = probe(tmp_path, attack)
    seen = ProbeDefense.seen
    index = record['bd_train']['poison_index']
    assert len(index) == round(0.1 * len(seen['train'])) > 0
    assert torch.equal(seen['poison_index'], index)
    assert torch.equal(seen['bd_train'].images, record['bd_train']['images'])
    poisoned, clean = seen['poisoned_train'], seen['train']
    assert torch.equal(poisoned.images[index], record['bd_train']['images'])
    assert torch.equal(poisoned.labels[index], record['bd_train']['backdoor_labels'])
    assert bool((poisoned.labels[index] == 0).all()) and bool((clean.labels[index] != 0).all())
    rest = torch.ones(len(clean), dtype=torch.bool)
    rest[index] = False
    assert torch.equal(poisoned.images[rest], clean.images[rest]) and torch.equal(poisoned.labels[rest], clean.labels[rest])
    if attack == 'wanet':   # the realisation is the recorded warp of those very images
        assert torch.equal(poisoned.images[index], warp(clean.images[index], record['trigger']['grid']))
    else:
        assert bool((poisoned.images[index][:, :, -3:, -3:] == 255).all())
    # detection is scored against the true indices: half of them flagged, nothing else
    detection = result['detection']
    assert (detection['flagged'], detection['true_positives'], detection['poisoned']) == (len(index) // 2, len(index) // 2, len(index))
    assert detection['precision'] == 1.0 and detection['recall'] == pytest.approx(0.5, abs=0.01) and detection['fpr'] == 0.0
    saved = load_torch(tmp_path / attack / 'defense' / 'probe_context' / DEFENSE_RESULT, 'defense record')
    assert 'model' not in saved and saved['detection'] == detection and len(saved['flagged']) == len(index) // 2
    summary = json.loads((tmp_path / attack / 'defense' / 'probe_context' / 'summary.json').read_text())
    assert summary['detection'] == detection and summary['probe'] is True


def test_new_model_is_fresh_and_normalised_for_the_dataset(tmp_path, cached_cifar):
    tiny_attack('badnet', tmp_path, model='resnet20')
    probe(tmp_path, 'badnet')
    fresh, trained = ProbeDefense.seen['new_model'], ProbeDefense.seen['model']
    spec = utils.data.dataset_spec('cifar10')
    assert torch.allclose(fresh.normalize.mean.flatten(), torch.tensor(spec.mean))
    assert torch.allclose(fresh.normalize.std.flatten(), torch.tensor(spec.std))
    assert type(fresh) is type(trained) and fresh is not trained
    assert not torch.equal(fresh.linear.weight.cpu(), trained.linear.weight.cpu())


def test_a_per_batch_record_without_its_realisation_gets_a_one_line_rebuild_message(tmp_path, cached_cifar):
    tiny_attack('wanet', tmp_path)
    path = tmp_path / 'wanet' / ATTACK_RESULT
    record = load_torch(path, 'record')
    record['bd_train'] = {key: value[:0] for key, value in record['bd_train'].items()}   # as written before
    save_torch(record, path)
    summary = json.loads((path.parent / 'summary.json').read_text())
    del summary['sha256']                                                                 # so were checksums
    (path.parent / 'summary.json').write_text(json.dumps(summary))
    with pytest.raises(UserError, match=r'rerun the attack \(--overwrite\)'):
        probe(tmp_path, 'wanet')


# --------------------------------------------------------------------------- attacks with a clean reference model
@register_attack
class CleanModelProbe(BadNet):
    """Test double of LF/LC/TrojanNN's shape: builds nothing, but asks for the clean model."""
    name = 'probe_clean_model'
    needs_clean_model = True
    reference = None

    def prepare(self, ctx):
        CleanModelProbe.reference = ctx.clean_model()


@pytest.fixture
def count_trainings(monkeypatch):
    calls = []
    real = utils.attack.train

    def counting(model, data, settings, device, **kwargs):
        calls.append(kwargs.get('desc'))
        return real(model, data, settings, device, **kwargs)

    monkeypatch.setattr(utils.attack, 'train', counting)
    return calls


def test_a_clean_model_attack_trains_the_clean_record_once_and_reuses_it(tmp_path, cached_cifar, count_trainings):
    tiny_attack('probe_clean_model', tmp_path, save_as='first', yaml_path=str(REPO_ROOT / 'config/attack/badnet/cifar10.yaml'))
    clean = [p for p in tmp_path.iterdir() if p.name.startswith('clean_cifar10_mlp_')]
    assert len(clean) == 1 and count_trainings == ['badnet', 'probe_clean_model']
    clean_record = load_torch(clean[0] / ATTACK_RESULT, 'record')
    assert clean_record['attack_config']['pratio'] == 0 and clean_record['attack_config']['epochs'] == 1
    stamp = (clean[0] / ATTACK_RESULT).stat().st_mtime_ns
    reference = CleanModelProbe.reference
    assert not reference.training
    assert all(torch.equal(v.cpu(), clean_record['model'][k]) for k, v in reference.state_dict().items())

    count_trainings.clear()
    tiny_attack('probe_clean_model', tmp_path, save_as='second', yaml_path=str(REPO_ROOT / 'config/attack/badnet/cifar10.yaml'))
    assert count_trainings == ['probe_clean_model']                    # reused, not retrained
    assert (clean[0] / ATTACK_RESULT).stat().st_mtime_ns == stamp

    count_trainings.clear()                                            # another recipe: another clean record
    tiny_attack('probe_clean_model', tmp_path, save_as='third', lr=0.02, yaml_path=str(REPO_ROOT / 'config/attack/badnet/cifar10.yaml'))
    assert count_trainings == ['badnet', 'probe_clean_model']
    assert len([p for p in tmp_path.iterdir() if p.name.startswith('clean_cifar10_mlp_')]) == 2


def test_a_named_clean_model_must_exist_be_clean_and_match(tmp_path, cached_cifar, count_trainings):
    yaml = str(REPO_ROOT / 'config/attack/badnet/cifar10.yaml')
    tiny_attack('badnet', tmp_path, save_as='poisoned')
    tiny_attack('badnet', tmp_path, save_as='clean', pratio=0)
    count_trainings.clear()
    for name, message in (('absent', 'not found'), ('poisoned', r'cannot serve as the clean model: pratio 0\.1')):
        with pytest.raises(UserError, match=message):
            tiny_attack('probe_clean_model', tmp_path, save_as='x', clean_model=name, yaml_path=yaml)
    with pytest.raises(UserError, match=r"model 'mlp' \(this run: 'resnet20'\)"):
        tiny_attack('probe_clean_model', tmp_path, save_as='x', clean_model='clean', model='resnet20', yaml_path=yaml)
    assert count_trainings == [] and not (tmp_path / 'x').exists()
    tiny_attack('probe_clean_model', tmp_path, save_as='x', clean_model='clean', yaml_path=yaml)
    assert count_trainings == ['probe_clean_model']


def test_apply_trigger_knows_train_from_test_and_gets_a_seeded_generator():
    """The stage signature per-sample and randomised triggers rely on: poison_train passes train=True,
    the split indices and a generator seeded from random_seed (the same draws on every run)."""
    seen = []

    class Noisy(Attack):
        name = 'noisy_probe'

        def apply_trigger(self, images, *, train, index=None, generator=None):
            noise = torch.randint(0, 2, images.shape, generator=generator, dtype=torch.uint8)
            seen.append((train, index.clone()))
            return images ^ noise

    from argparse import Namespace
    split = utils.data.Split(torch.zeros(50, 3, 4, 4, dtype=torch.uint8), torch.arange(50) % 5)
    args = Namespace(attack_target=0, attack_label_trans='all2one', pratio=0.2, random_seed=3)
    spec = utils.data.dataset_spec('cifar10')
    first, again = Noisy().poison_train(split, args, spec), Noisy().poison_train(split, args, spec)
    assert torch.equal(first.images, again.images) and first.images.any()
    test = Noisy().poison_test(split, args, spec)
    assert [train for train, _ in seen] == [True, True, False]
    assert torch.equal(seen[0][1], first.index) and torch.equal(seen[2][1], test.index)


# --------------------------------------------------------------------------- a trigger trained with the model
class AdditiveTrigger(torch.nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.pattern = torch.nn.Parameter(torch.zeros(shape))


@register_attack
class LearnedTriggerProbe(Attack):
    """Test double of Input-aware/LIRA's shape: an additive trigger trained jointly with the
    classifier through the batch hook, checkpointed beside it, recorded after training."""
    name = 'probe_learned_trigger'
    per_batch = True
    learned_trigger = True

    def prepare(self, ctx):
        self.trigger = AdditiveTrigger(ctx.spec.input_shape).to(ctx.device)

    def apply_trigger(self, images, *, train, index=None, generator=None):
        with torch.no_grad():
            x = images.float() / 255 + self.trigger.pattern.detach().cpu()
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)

    def poison_batch(self, x, y, generator, model):
        k = len(y) // 10
        poisoned = (x[:k] + self.trigger.pattern).clamp(0, 1)      # differentiable in the pattern
        return torch.cat([poisoned, x[k:]]), torch.cat([torch.zeros_like(y[:k]), y[k:]])

    def train_model(self, ctx, model, data, settings):
        groups = [{'params': model.parameters()}, {'params': self.trigger.parameters(), 'lr': 0.05}]
        return utils.attack.train(model, data, settings, ctx.device, optimizer=groups, batch_hook=self.poison_batch,
                                  state_modules={'trigger': self.trigger}, evaluate_fn=ctx.evaluate,
                                  workdir=ctx.folder, resume=ctx.args.resume, log=ctx.log, desc=self.name)


def test_a_learned_trigger_is_trained_checkpointed_and_recorded_after_training(tmp_path, cached_cifar):
    record = tiny_attack('probe_learned_trigger', tmp_path, epochs=2, pratio=0.1, augment=False,
                         yaml_path=str(REPO_ROOT / 'config/attack/prototype/cifar10.yaml'))
    pattern = load_torch(tmp_path / 'probe_learned_trigger' / 'checkpoint.pt', 'checkpoint')['modules']['trigger']['pattern']
    assert pattern.abs().sum() > 0                                   # the trigger moved
    _, test = utils.data.load_splits('cifar10', CIFAR10_DIR, 0.02, 0.02, 0)
    bd_test = record['bd_test']
    expected = ((test.images[bd_test['index']].float() / 255 + pattern).clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(bd_test['images'], expected)                  # made with the final trigger
    rows = (tmp_path / 'probe_learned_trigger' / 'metrics.csv').read_text().splitlines()
    assert len(rows) == 3 and record['metrics']['asr'] == pytest.approx(float(rows[-1].split(',')[rows[0].split(',').index('asr')]))
