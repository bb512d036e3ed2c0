"""LF, LC and TrojanNN: attacks whose trigger is built on a clean reference model. Each trigger's
defining property on real CIFAR-10 images, seeded and deterministic generation, a tiny record that a
defense can rebuild its poisoned test inputs from, the generated artefact reused by a second run, and
bad input refused in one line. Tiny models, subsets and step counts keep the file fast on a CPU."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import utils.data
from attack.lc_attack import add_trigger, four_corner_pattern, pgd_away_from_label
from attack.lf_attack import add_perturbation, low_frequency_uap
from attack.trojannn_attack import (feeding_layer, generate_trigger, layer_output, most_connected_neurons,
                                    neuron_values, square_mask)
from conftest import CIFAR10_DIR, ONE_LINE_ERROR, REPO_ROOT, rejection, run_script, tiny_attack
from models import build_model
from utils import UserError
from utils.config import parse_config
from utils.data import dataset_spec
from utils.record import ATTACK_RESULT
from utils.registry import ATTACKS

SPEC = dataset_spec('cifar10')
CPU = torch.device('cpu')
# step counts small enough for a busy CPU; everything else comes from the attacks' YAML files
QUICK = {'lf': {'lf_steps': 4, 'lf_num_images': 32}, 'lc': {'lc_steps': 3}, 'trojannn': {'trojannn_steps': 10}}
BUILDERS = {'lf': 'low_frequency_uap', 'lc': 'pgd_away_from_label', 'trojannn': 'generate_trigger'}
ARTEFACTS = {'lf': 'lf_uap', 'lc': 'lc_pgd', 'trojannn': 'trojannn_trigger'}


def fresh_model(name='mlp', seed=0):
    torch.manual_seed(seed)
    return build_model(name, SPEC.num_classes, SPEC.input_shape, dataset='cifar10').eval()


def configured(name, *argv):
    """Attack ``name`` with its YAML plus ``argv`` parsed and set up (nothing loaded or written)."""
    attack = ATTACKS.get(name)()
    args = parse_config(attack.build_parser(str(ATTACKS.script(name))),
                        ['--yaml_path', str(REPO_ROOT / 'config/attack' / name / 'cifar10.yaml'), *map(str, argv)])
    attack.setup(args, SPEC)
    return attack, args


def outside_band(perturbation: torch.Tensor, cutoff: float) -> tuple[float, float]:
    """(largest Fourier magnitude above the cut-off, largest overall), with numpy's FFT and frequencies
    counted in cycles per image: radius sqrt(ky^2 + kx^2) > cutoff * N / 2."""
    spectrum = np.abs(np.fft.fft2(perturbation.double().numpy()))
    n = perturbation.shape[-1]
    k = np.fft.fftfreq(n) * n
    radius = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    return float(spectrum[..., radius > cutoff * n / 2 + 1e-9].max()), float(spectrum.max())


# --------------------------------------------------------------------------- LF
def test_lf_perturbation_has_no_energy_above_the_cutoff_and_respects_its_bound(cifar10):
    train, test = cifar10
    model, images = fresh_model(), train.images[:48]
    v = low_frequency_uap(model, images, 0, eps=12.0, cutoff=0.25, steps=5, step_size=4.0, device=CPU)
    assert v.shape == (3, 32, 32) and v.dtype == torch.float32
    high, peak = outside_band(v, 0.25)
    assert peak > 0 and high <= 1e-5 * peak                       # band-limited
    assert v.abs().max() <= 12.0 + 1e-4 and v.abs().max() > 6.0     # within the bound, and it moved
    x = images.float() / 255
    target = torch.zeros(len(images), dtype=torch.long)
    with torch.no_grad():                                           # it pushes toward the target class
        assert F.cross_entropy(model((x + v / 255).clamp(0, 1)), target) < F.cross_entropy(model(x), target)
    poisoned = add_perturbation(test.images[:256], v)               # poisoned pixels: x + v, rounded, clipped
    expected = (test.images[:256].double() + v.double()).round().clamp(0, 255).to(torch.uint8)
    assert poisoned.dtype == torch.uint8 and torch.equal(poisoned, expected)


def test_lf_perturbation_is_deterministic_and_seeded_by_its_images(cifar10):
    train = cifar10[0]
    model = fresh_model()
    first, again = (low_frequency_uap(model, train.images[:32], 0, eps=20.0, cutoff=0.2, steps=3, step_size=5.0,
                                      device=CPU) for _ in range(2))
    other = low_frequency_uap(model, train.images[32:64], 0, eps=20.0, cutoff=0.2, steps=3, step_size=5.0, device=CPU)
    assert torch.equal(first, again) and not torch.equal(first, other)


# --------------------------------------------------------------------------- LC
def test_lc_four_corner_trigger():
    pattern = four_corner_pattern(32, 32)
    assert int((pattern != 0).sum()) == 36 and set(pattern.unique().tolist()) == {-1, 0, 1}
    corner = pattern[:3, :3]
    assert torch.equal(corner, torch.tensor([[1, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=torch.int8))
    assert torch.equal(pattern, pattern.flip(1)) and torch.equal(pattern, pattern.flip(0))   # survives flips
    images = torch.full((2, 3, 32, 32), 250, dtype=torch.uint8)
    out = add_trigger(images, pattern, 32.0)
    assert int(out[0, 0, 0, 0]) == 255 and int(out[0, 0, 0, 1]) == 218 and int(out[0, 0, 5, 5]) == 250


def test_lc_pgd_stays_within_epsilon_and_raises_the_loss(cifar10):
    train = cifar10[0]
    model = fresh_model()
    index = torch.nonzero(train.labels == 0).flatten()[:48]
    images, labels = train.images[index], train.labels[index]
    adversarial = pgd_away_from_label(model, images, labels, eps=8.0, steps=4, step_size=2.0, device=CPU)
    change = adversarial.int() - images.int()
    assert adversarial.dtype == torch.uint8 and change.abs().max() <= 8 and (change != 0).float().mean() > 0.5
    with torch.no_grad():
        loss_before = F.cross_entropy(model(images.float() / 255), labels)
        assert F.cross_entropy(model(adversarial.float() / 255), labels) > loss_before
    again = pgd_away_from_label(model, images, labels, eps=8.0, steps=4, step_size=2.0, device=CPU)
    assert torch.equal(adversarial, again)                                   # deterministic (no random start)
    fractional = pgd_away_from_label(model, images, labels, eps=3.5, steps=4, step_size=2.0, device=CPU)
    assert (fractional.int() - images.int()).abs().max() <= 3               # rounding never leaves the ball


# --------------------------------------------------------------------------- TrojanNN
def test_trojannn_selects_the_neurons_most_connected_to_the_layer_input():
    resnet = fresh_model('resnet20')
    probe = torch.zeros(1, *SPEC.input_shape)
    assert feeding_layer(resnet, 'features', probe) is resnet.layer3[2].conv2
    assert feeding_layer(resnet, 'layer1', probe) is resnet.layer1[2].conv2
    mlp = fresh_model('mlp')
    assert feeding_layer(mlp, 'features', probe) is mlp.hidden[1]
    weight = resnet.layer3[2].conv2.weight.detach().abs()
    strength = weight.sum((1, 2, 3))
    chosen = most_connected_neurons(resnet.layer3[2].conv2, 3)
    assert chosen.tolist() == torch.topk(strength, 3).indices.tolist()


def test_trojannn_trigger_stays_inside_its_mask_and_drives_its_neurons(cifar10):
    model = fresh_model('resnet20')
    mask = square_mask(32, 32, 10, 'bottom_right')
    neurons = most_connected_neurons(feeding_layer(model, 'features', torch.zeros(1, 3, 32, 32)), 2)

    def trigger(steps, seed=0):
        return generate_trigger(model, 'features', neurons, mask, 3, target_value=100.0, steps=steps, step_size=25.5,
                                seed=seed, device=CPU)

    start, start_values = trigger(0)
    pattern, values = trigger(8)
    assert pattern.dtype == torch.uint8 and not bool(pattern[:, ~mask[0]].any())    # nothing outside the mask
    assert sum(values) > sum(start_values)                                       # the neurons rise
    with torch.no_grad():
        expected = neuron_values(layer_output(model, 'features', pattern[None].float() / 255))[0, neurons]
    assert values == pytest.approx(expected.tolist(), rel=1e-5)
    assert torch.equal(trigger(8)[0], pattern) and not torch.equal(trigger(8, seed=1)[0], pattern)   # seeded
    attack, _ = configured('trojannn')
    attack.pattern = pattern
    images = cifar10[1].images[:256]
    poisoned = attack.apply_trigger(images, train=False)
    changed = (poisoned != images).any(0).any(0)
    assert not bool(changed[~mask[0]].any()) and bool(changed[mask[0]].any())
    assert torch.equal(poisoned[:, :, 22:, 22:], pattern[:, 22:, 22:].expand(256, -1, -1, -1))


# --------------------------------------------------------------------------- records, reuse and determinism
def rebuild_bd_test(name, record, test):
    """What a defense does: the poisoned test inputs from the clean test split and record['trigger']."""
    trigger, clean = record['trigger'], test.images[record['bd_test']['index']]
    if name == 'lf':
        return add_perturbation(clean, trigger['perturbation'])
    if name == 'lc':
        return add_trigger(clean, trigger['pattern'], trigger['amplitude'])
    return torch.where(trigger['mask'], trigger['pattern'], clean)


@pytest.mark.parametrize('name,seed_option', [('lf', 'lf_seed'), ('lc', None), ('trojannn', 'trojannn_seed')])
def test_record_round_trip_reuse_and_seeds(tmp_path, cached_cifar, monkeypatch, name, seed_option):
    tiny_attack('badnet', tmp_path, save_as='clean', pratio=0)
    record = tiny_attack(name, tmp_path, save_as='first', clean_model='clean', **QUICK[name])
    log = (tmp_path / 'first' / 'log.txt').read_text()
    assert f'building {ARTEFACTS[name]}' in log

    # the record reloads without pickled objects and rebuilds its poisoned test inputs
    saved = torch.load(tmp_path / 'first' / ATTACK_RESULT, map_location='cpu', weights_only=True)
    assert saved['attack'] == name and saved['attack_config']['clean_model'] == 'clean'
    assert (tmp_path / 'first' / 'preview.png').stat().st_size > 0
    train, test = utils.data.load_splits('cifar10', CIFAR10_DIR, 0.02, 0.02, 0)
    bd_test, bd_train = saved['bd_test'], saved['bd_train']
    assert torch.equal(rebuild_bd_test(name, saved, test), bd_test['images'])
    assert len(bd_test['index']) == int((test.labels != 0).sum()) and bool((bd_test['backdoor_labels'] == 0).all())
    clean_train = train.images[bd_train['poison_index']].int()
    if name == 'lf':
        high, peak = outside_band(saved['trigger']['perturbation'], saved['trigger']['cutoff'])
        assert high <= 1e-5 * peak and saved['trigger']['perturbation'].abs().max() <= 51 + 1e-3
        assert (bd_train['images'].int() - clean_train).abs().max() <= 52     # eps 51, plus rounding
    if name == 'lc':   # clean-label: only target-class images, labels kept, within eps outside the trigger
        assert saved['clean_label'] and len(bd_train['poison_index']) == int((train.labels == 0).sum())
        assert bool((train.labels[bd_train['poison_index']] == 0).all())
        assert torch.equal(bd_train['original_labels'], bd_train['backdoor_labels'])
        pattern, amplitude = four_corner_pattern(32, 32), saved['trigger']['amplitude']
        corners, light, dark = pattern != 0, pattern == 1, pattern == -1
        poisoned = bd_train['images'].int()
        change = (poisoned - clean_train).abs()
        assert change[:, :, ~corners].max() <= 8 and (change[:, :, ~corners] > 0).float().mean() > 0.5
        # the trigger is added to the perturbed image (within 8 of the clean one), then clipped
        assert bool((poisoned[:, :, light] >= (clean_train[:, :, light] - 8 + amplitude).clamp(max=255)).all())
        assert bool((poisoned[:, :, dark] <= (clean_train[:, :, dark] + 8 - amplitude).clamp(min=0)).all())
    if name == 'trojannn':
        mask = saved['trigger']['mask']
        assert not bool((bd_train['images'] != train.images[bd_train['poison_index']])[:, :, ~mask[0]].any())
        assert saved['trigger']['neurons'].tolist() == record['trigger']['neurons'].tolist()

    # a second run with the same inputs reuses the artefact: building it again would fail
    artefacts = sorted((tmp_path / '.artefacts').iterdir())
    assert len(artefacts) == 1
    stamp = artefacts[0].stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError('the artefact was rebuilt')

    with monkeypatch.context() as patch:
        patch.setattr(f'attack.{name}_attack.{BUILDERS[name]}', refuse)
        again = tiny_attack(name, tmp_path, save_as='second', clean_model='clean', **QUICK[name])
    assert f'reusing {ARTEFACTS[name]}' in (tmp_path / 'second' / 'log.txt').read_text()
    assert artefacts[0].stat().st_mtime_ns == stamp
    assert torch.equal(again['bd_test']['images'], bd_test['images'])
    assert torch.equal(again['bd_train']['images'], bd_train['images'])

    # built anew from scratch, the same inputs give the same artefact; another seed another one
    shutil.rmtree(tmp_path / '.artefacts')
    rebuilt = tiny_attack(name, tmp_path, save_as='third', clean_model='clean', **QUICK[name])
    assert f'building {ARTEFACTS[name]}' in (tmp_path / 'third' / 'log.txt').read_text()
    assert torch.equal(rebuilt['bd_train']['images'], bd_train['images'])
    if seed_option:
        other = tiny_attack(name, tmp_path, save_as='fourth', clean_model='clean', **QUICK[name], **{seed_option: 1})
        assert not torch.equal(other['bd_test']['images'], bd_test['images'])
        assert len(list((tmp_path / '.artefacts').iterdir())) == 2


# --------------------------------------------------------------------------- bad input
BAD = [
    ('lf', ('--lf_eps', 0), '--lf_eps'),
    ('lf', ('--lf_eps', 300), '--lf_eps'),
    ('lf', ('--lf_cutoff', 1.5), '--lf_cutoff'),
    ('lf', ('--lf_steps', 0), '--lf_steps'),
    ('lf', ('--attack_label_trans', 'all2all'), 'all2one'),
    ('lc', ('--lc_eps', -1), '--lc_eps'),
    ('lc', ('--lc_eps', 256), '--lc_eps'),
    ('lc', ('--lc_amplitude', 0), '--lc_amplitude'),
    ('lc', ('--lc_step_size', 'x'), '--lc_step_size'),
    ('lc', ('--attack_label_trans', 'all2all'), 'all2one'),
    ('trojannn', ('--trojannn_mask_size', 33), 'trojannn_mask_size must lie in 1..32'),
    ('trojannn', ('--trojannn_layer', 'layer9'), 'trojannn_layer must be one of features, hidden'),
    ('trojannn', ('--trojannn_num_neurons', 300), 'trojannn_num_neurons must lie in 1..256'),
    ('trojannn', ('--trojannn_step_size', 0), '--trojannn_step_size'),
    ('trojannn', ('--trojannn_mask_position', 'middle'), '--trojannn_mask_position'),
    ('trojannn', ('--trojannn_mask_path', 'MISSING'), 'cannot read trigger image'),
]


@pytest.mark.parametrize('name,argv,message', BAD)
def test_bad_options_are_refused_in_one_line(tmp_path, capsys, name, argv, message):
    argv = [str(tmp_path / 'missing.png') if a == 'MISSING' else a for a in argv]
    assert message in rejection(lambda: configured(name, '--model', 'mlp', *argv), capsys)


@pytest.mark.parametrize('name', ['lf', 'lc', 'trojannn'])
def test_a_missing_or_mismatched_clean_record_is_refused(tmp_path, cached_cifar, name):
    """Refused before anything is written: no record folder, no artefact."""
    tiny_attack('badnet', tmp_path, save_as='clean', pratio=0)
    with pytest.raises(UserError, match='not found') as missing:
        tiny_attack(name, tmp_path, save_as='x', clean_model='absent')
    mismatch = r"cannot serve as the clean model: model 'mlp' \(this run: 'resnet20'\)"
    with pytest.raises(UserError, match=mismatch) as other:
        tiny_attack(name, tmp_path, save_as='x', clean_model='clean', model='resnet20')
    assert '\n' not in str(missing.value) + str(other.value)
    assert not (tmp_path / 'x').exists() and not (tmp_path / '.artefacts').exists()


@pytest.mark.parametrize('name,argv', [('lf', ['--lf_cutoff', '0']), ('lc', ['--lc_eps', '300']),
                                       ('trojannn', ['--clean_model', 'absent'])])
def test_bad_input_exits_2_with_one_line_from_the_script(tmp_path, name, argv):
    records = tmp_path / 'record'
    result = run_script([f'./attack/{name}_attack.py', '--yaml_path', f'../config/attack/{name}/cifar10.yaml',
                         '--dataset_path', CIFAR10_DIR, '--model', 'mlp', '--record_root', records,
                         '--save_folder_name', 'bad', '--device', 'cpu', *argv], timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and ONE_LINE_ERROR.match(lines[0]), result.stderr
    assert not records.exists()
