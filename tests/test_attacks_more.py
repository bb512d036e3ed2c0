"""Blended, SIG and WaNet: trigger formulas on real CIFAR-10 images, poisoning counts and seeds,
WaNet's per-batch hook, bad input, and a tiny end-to-end run whose record reloads with weights_only."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attack.blended_attack import Blended, blend  # noqa: E402
from attack.sig_attack import SIG, add_signal  # noqa: E402
from attack.wanet_attack import WaNet, warp  # noqa: E402
from conftest import ONE_LINE_ERROR, rejection  # noqa: E402
from utils.config import parse_config  # noqa: E402
from utils.data import Split, dataset_spec, load_dataset, load_splits, to_float  # noqa: E402
from utils.poison import poisoned_training_split  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / 'shared/data/cifar10'
SPEC = dataset_spec('cifar10')
SCRIPTS = {'blended': Blended, 'sig': SIG, 'wanet': WaNet}
RECORD_KEYS = {'model_name', 'num_classes', 'input_shape', 'model', 'dataset', 'attack', 'attack_config',
               'clean_label', 'bd_train', 'bd_test', 'metrics', 'trigger'}


@pytest.fixture(scope='module')
def cifar():
    if not (DATA / 'cifar-10-batches-py').is_dir():
        pytest.skip(f'CIFAR-10 not found in {DATA}')
    return load_dataset('cifar10', DATA)


@pytest.fixture(scope='module')
def small(cifar):
    """The first 2,000 training and 1,000 test images (all classes present)."""
    train, test = cifar
    return Split(train.images[:2000], train.labels[:2000]), Split(test.images[:1000], test.labels[:1000])


def configured(name, *argv):
    """An attack of ``name`` with its options parsed from its YAML plus ``argv``, and set up."""
    attack = SCRIPTS[name]()
    script = str(REPO / 'attack' / f'{name}_attack.py')
    args = parse_config(attack.build_parser(script),
                        ['--yaml_path', str(REPO / 'config/attack' / name / 'cifar10.yaml'), *map(str, argv)])
    attack.setup(args, SPEC)
    return attack, args


def blended_reference(images, pattern, alpha):
    x = images.numpy().astype(np.float64)
    t = pattern.numpy().astype(np.float64)
    return np.clip(np.rint((1 - alpha) * x + alpha * t), 0, 255).astype(np.uint8)


def sig_reference(images, delta, f):
    x = images.numpy().astype(np.float64)
    width = x.shape[-1]
    v = delta * np.sin(2 * np.pi * np.arange(width) * f / width)
    return np.clip(np.rint(x + v), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- Blended
def test_blended_default_trigger_is_the_shipped_natural_image(cifar):
    from PIL import Image
    attack, _ = configured('blended')
    with Image.open(REPO / 'config/attack/blended/chelsea_64.png') as image:
        expected = torch.from_numpy(np.asarray(image.convert('RGB').resize((32, 32), Image.NEAREST))).permute(2, 0, 1)
    assert torch.equal(attack.pattern, expected) and attack.pattern.float().std() > 20
    images = cifar[1].images[:32]
    np.testing.assert_array_equal(attack.apply_trigger(images, train=False).numpy(),
                                  blended_reference(images, attack.pattern, 0.2))


def test_blended_pixels_equal_formula(cifar):
    attack, args = configured('blended', '--attack_trigger_img_path', '')
    assert attack.train_alpha == attack.test_alpha == 0.2 and attack.pattern.dtype == torch.uint8
    images = cifar[0].images[:256]
    out = attack.apply_trigger(images, train=False)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(out.numpy(), blended_reference(images, attack.pattern, 0.2))
    # the default pattern: uniform noise over 0..255, from pattern_seed alone
    pattern = attack.pattern.float()
    assert attack.pattern.min() == 0 and attack.pattern.max() == 255 and abs(pattern.mean() - 127.5) < 3
    same, _ = configured('blended', '--attack_trigger_img_path', '', '--random_seed', 7)
    other, _ = configured('blended', '--attack_trigger_img_path', '', '--pattern_seed', 1)
    assert torch.equal(same.pattern, attack.pattern) and not torch.equal(other.pattern, attack.pattern)


def test_blended_train_and_test_alpha(small):
    train, test = small
    attack, args = configured('blended', '--attack_train_blended_alpha', 0.3, '--attack_test_blended_alpha', 0.1,
                              '--pratio', 0.05)
    bd_train = attack.poison_train(train, args, SPEC)
    assert len(bd_train) == round(0.05 * len(train)) and bool((train.labels[bd_train.index] != 0).all())
    assert bool((bd_train.backdoor_labels == 0).all())
    np.testing.assert_array_equal(bd_train.images.numpy(),
                                  blended_reference(train.images[bd_train.index], attack.pattern, 0.3))
    bd_test = attack.poison_test(test, args, SPEC)
    assert torch.equal(bd_test.index, torch.nonzero(test.labels != 0).flatten())
    np.testing.assert_array_equal(bd_test.images.numpy(),
                                  blended_reference(test.images[bd_test.index], attack.pattern, 0.1))
    np.testing.assert_array_equal(attack.apply_trigger(test.images[:8], train=True).numpy(),
                                  blended_reference(test.images[:8], attack.pattern, 0.3))


def test_blended_trigger_image(tmp_path, cifar):
    from PIL import Image
    picture = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / 'trigger.png')
    attack, _ = configured('blended', '--attack_trigger_img_path', tmp_path / 'trigger.png')
    assert attack.pattern.shape == (3, 32, 32)
    # nearest resize 8 -> 32: every source pixel becomes a 4x4 block
    np.testing.assert_array_equal(attack.pattern.numpy(), picture.transpose(2, 0, 1).repeat(4, 1).repeat(4, 2))
    images = cifar[1].images[:64]
    np.testing.assert_array_equal(attack.apply_trigger(images, train=False).numpy(),
                                  blended_reference(images, attack.pattern, 0.2))


# --------------------------------------------------------------------------- SIG
def test_sig_poisons_only_target_class_and_keeps_labels(small):
    train, test = small
    attack, args = configured('sig', '--pratio', 0.5)
    assert attack.clean_label
    bd_train = attack.poison_train(train, args, SPEC)
    target = torch.nonzero(train.labels == 0).flatten()
    assert len(bd_train) == round(0.5 * len(target))
    assert bool(torch.isin(bd_train.index, target).all())
    assert bool((bd_train.original_labels == 0).all()) and bool((bd_train.backdoor_labels == 0).all())
    seen = poisoned_training_split(train, bd_train)
    assert torch.equal(seen.labels, train.labels)
    changed = torch.nonzero((seen.images != train.images).flatten(1).any(1)).flatten()
    assert bool(torch.isin(changed, bd_train.index).all()) and len(changed) >= 0.95 * len(bd_train)
    np.testing.assert_array_equal(bd_train.images.numpy(), sig_reference(train.images[bd_train.index], 40, 6))
    bd_test = attack.poison_test(test, args, SPEC)
    assert torch.equal(bd_test.index, torch.nonzero(test.labels != 0).flatten())
    assert bool((bd_test.original_labels != 0).all()) and bool((bd_test.backdoor_labels == 0).all())
    np.testing.assert_array_equal(bd_test.images.numpy(), sig_reference(test.images[bd_test.index], 40, 6))


def test_sig_default_poisons_the_whole_target_class(small):
    train, _ = small
    attack, args = configured('sig')
    assert args.pratio == 1.0 and args.sig_delta == 40 and args.sig_f == 6
    bd_train = attack.poison_train(train, args, SPEC)
    assert torch.equal(bd_train.index, torch.nonzero(train.labels == 0).flatten())


@pytest.mark.parametrize('name,pratio', [('blended', 0.1), ('sig', 0.3)])
def test_poison_counts_and_seed_determinism(small, name, pratio):
    train, _ = small

    def poison(seed):
        attack, args = configured(name, '--random_seed', seed, '--pratio', pratio)
        return attack.poison_train(train, args, SPEC)

    first, again, other = poison(0), poison(0), poison(1)
    base = len(train) if name == 'blended' else int((train.labels == 0).sum())  # sig: of the target class
    assert len(first) == len(other) == round(pratio * base)
    assert torch.equal(first.index, again.index) and torch.equal(first.images, again.images)
    assert not torch.equal(first.index, other.index)


# --------------------------------------------------------------------------- WaNet
def test_wanet_identity_when_s_is_zero(cifar):
    attack, _ = configured('wanet', '--s', 0)
    assert torch.equal(attack.grid, attack.identity_grid)
    images = cifar[1].images[:512]
    assert torch.equal(attack.apply_trigger(images, train=False), images)


def test_wanet_moves_pixels_at_most_the_bound(cifar):
    """With grid_rescale 1: |clamp(g0 + s n / H) - g0| <= s |n| / H in normalised coordinates (clamp
    is 1-Lipschitz and fixes the identity g0 in [-1, 1]). grid_sample (align_corners=True) maps a
    normalised coordinate u to the pixel coordinate (u + 1) (W - 1) / 2, so a pixel moves at most
    s max|n| (W - 1) / (2 H) pixels (about s/2 max|n|), per axis with that axis' noise."""
    attack, _ = configured('wanet')
    _, height, width = SPEC.input_shape
    noise = attack.noise_grid[0]
    bound_x = attack.s * noise[..., 0].abs().max().item() * (width - 1) / (2 * height)
    bound_y = attack.s * noise[..., 1].abs().max().item() * (height - 1) / (2 * height)
    shift = (attack.grid - attack.identity_grid)[0]
    assert shift[..., 0].abs().max().item() * (width - 1) / 2 <= bound_x + 1e-5
    assert shift[..., 1].abs().max().item() * (height - 1) / 2 <= bound_y + 1e-5
    # a ramp image reads out where each output pixel was sampled (bilinear is exact on linear data)
    cols = torch.arange(width).expand(height, width)
    rows = torch.arange(height)[:, None].expand(height, width)
    ramp = torch.stack([8 * cols, 8 * rows, torch.zeros_like(cols)]).to(torch.uint8)[None]
    out = attack.apply_trigger(ramp, train=False)[0].double() / 8
    moved_x, moved_y = (out[0] - cols).abs().max().item(), (out[1] - rows).abs().max().item()
    rounding = 0.5 / 8
    assert moved_x <= bound_x + rounding + 1e-6 and moved_y <= bound_y + rounding + 1e-6
    assert max(moved_x, moved_y) > 0.25 * max(bound_x, bound_y)  # the warp does move pixels
    # on real images every output pixel lies within the range of its input neighbourhood
    radius = math.floor(max(bound_x, bound_y)) + 1
    images = cifar[1].images[:256]
    warped = attack.apply_trigger(images, train=False).float()
    x = images.float()
    high = F.max_pool2d(x, 2 * radius + 1, stride=1, padding=radius)
    low = -F.max_pool2d(-x, 2 * radius + 1, stride=1, padding=radius)
    assert bool((warped <= high).all()) and bool((warped >= low).all())
    assert (warped != x).float().mean() > 0.3


def test_wanet_grid_is_seeded(cifar):
    attack, _ = configured('wanet')
    again, _ = configured('wanet', '--grid_seed', 0)  # grid_seed null: random_seed (0)
    other, _ = configured('wanet', '--random_seed', 1)
    assert attack.grid_seed == 0 and torch.equal(attack.grid, again.grid)
    assert not torch.equal(attack.grid, other.grid)
    noise = attack.noise_grid
    assert noise.shape == (1, 32, 32, 2)


def test_wanet_batch_hook(cifar):
    attack, args = configured('wanet')
    hook = attack.batch_hook(args, SPEC)
    x, y = to_float(cifar[0].images[:128]), cifar[0].labels[:128]
    x_before, y_before = x.clone(), y.clone()
    out_x, out_y = hook(x, y, torch.Generator().manual_seed(5), None)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)  # inputs untouched
    bd, cross = attack.plan(128, torch.Generator().manual_seed(5))
    assert len(bd) == int(0.1 * 128) == 12 and len(cross) == int(12 * 2) == 24
    assert not bool(torch.isin(bd, cross).any())
    rest = torch.ones(128, dtype=torch.bool)
    rest[bd] = rest[cross] = False
    expected_bd = F.grid_sample(x[bd], attack.grid.expand(len(bd), -1, -1, -1), align_corners=True)
    torch.testing.assert_close(out_x[bd], expected_bd, rtol=0, atol=1e-6)
    assert bool((out_y[bd] == 0).all()) and torch.equal(out_y[cross], y[cross])
    assert torch.equal(out_x[rest], x[rest]) and torch.equal(out_y[rest], y[rest])
    # noise-mode samples: warped by grid + u / H, |u| <= 1, so not the backdoor warp itself
    pure = F.grid_sample(x[cross], attack.grid.expand(len(cross), -1, -1, -1), align_corners=True)
    assert bool(((out_x[cross] - pure).flatten(1).abs().amax(1) > 1e-3).all())
    # deterministic for the same generator seed, different for another
    again_x, again_y = hook(x, y, torch.Generator().manual_seed(5), None)
    other_x, _ = hook(x, y, torch.Generator().manual_seed(6), None)
    assert torch.equal(again_x, out_x) and torch.equal(again_y, out_y) and not torch.equal(other_x, out_x)
    # a short last batch
    bd, cross = attack.plan(80, torch.Generator().manual_seed(0))
    assert (len(bd), len(cross)) == (8, 16)


def test_wanet_log_line_states_the_per_batch_counts(small):
    attack, args = configured('wanet')
    line = attack.describe_training_poison(attack.poison_train(small[0], args, SPEC), args)
    assert 'per full batch of 128: 12 poisoned and 24 noise-mode samples' in line
    assert 'seeded realisation of 200 poisoned samples' in line
    attack, args = configured('wanet', '--pratio', 0.005)
    assert 'one poisoned sample with probability 0.64' in attack.describe_training_poison(
        attack.poison_train(small[0], args, SPEC), args)


def test_wanet_low_pratio_and_clean_baseline(cifar):
    attack, args = configured('wanet', '--pratio', 0.005)
    generator = torch.Generator().manual_seed(0)
    counts = [attack.plan(100, generator) for _ in range(400)]
    bd = [len(b) for b, _ in counts]
    assert set(bd) <= {0, 1} and all(len(c) == 2 * len(b) for b, c in counts)
    assert 0.4 < sum(bd) / len(bd) < 0.6  # one poisoned sample with probability 0.005 * 100
    clean, clean_args = configured('wanet', '--pratio', 0)
    assert clean.batch_hook(clean_args, SPEC) is None


def test_wanet_training_resumes_identically(tmp_path, small):
    """Per-batch poisoning draws only from the trainer's per-epoch generator: two epochs in one go
    equal one epoch, a checkpoint and a resumed second epoch."""
    from models import build_model
    from utils.train import TrainSettings, train
    attack, args = configured('wanet')
    hook = attack.batch_hook(args, SPEC)
    data = Split(small[0].images[:512], small[0].labels[:512])

    def run(epochs, folder, resume=False):
        torch.manual_seed(0)
        model = build_model('mlp', 10, SPEC.input_shape)
        settings = TrainSettings(epochs=epochs, batch_size=128, lr=0.01, lr_scheduler='none')
        train(model, data, settings, torch.device('cpu'), workdir=folder, resume=resume, batch_hook=hook,
              log=lambda message: None)
        return model.state_dict()

    (tmp_path / 'whole').mkdir()
    (tmp_path / 'split').mkdir()
    whole = run(2, tmp_path / 'whole')
    run(1, tmp_path / 'split')
    resumed = run(2, tmp_path / 'split', resume=True)
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_wanet_poisoned_sets(small):
    train, test = small
    attack, args = configured('wanet')
    bd_train = attack.poison_train(train, args, SPEC)   # a seeded realisation of one epoch's poisoning
    assert len(bd_train) == round(0.1 * len(train)) and bd_train.images.dtype == torch.uint8
    assert bool((train.labels[bd_train.index] != 0).all()) and bool((bd_train.backdoor_labels == 0).all())
    assert torch.equal(bd_train.images, warp(train.images[bd_train.index], attack.grid))
    assert torch.equal(attack.poison_train(train, args, SPEC).index, bd_train.index)
    bd_test = attack.poison_test(test, args, SPEC)
    assert torch.equal(bd_test.index, torch.nonzero(test.labels != 0).flatten())
    assert torch.equal(bd_test.images, warp(test.images[bd_test.index], attack.grid))


# --------------------------------------------------------------------------- bad input
BAD = [
    ('blended', ('--attack_train_blended_alpha', 1.5), 'attack_train_blended_alpha'),
    ('blended', ('--attack_test_blended_alpha', -0.1), 'attack_test_blended_alpha'),
    ('blended', ('--attack_trigger_img_path', 'NOT_AN_IMAGE'), 'cannot read trigger image'),
    ('blended', ('--attack_trigger_img_path', 'MISSING'), 'cannot read trigger image'),
    ('blended', ('--pattern_seed', -1), '--pattern_seed'),
    ('sig', ('--sig_delta', -5), 'sig_delta'),
    ('sig', ('--sig_f', 0), 'sig_f'),
    ('sig', ('--attack_label_trans', 'all2all'), 'all2one'),
    ('wanet', ('--k', 33), 'k must lie'),
    ('wanet', ('--k', 1), 'k must lie'),
    ('wanet', ('--s', -0.5), '--s: must be >= 0'),
    ('wanet', ('--cross_ratio', -1), 'cross_ratio'),
    ('wanet', ('--k', 1.5), '--k'),
    ('wanet', ('--grid_rescale', 0), 'grid_rescale'),
    ('wanet', ('--pratio', 0.5), 'pratio * (1 + cross_ratio)'),
]


def _bad_argv(argv, tmp_path):
    not_image = tmp_path / 'not_an_image.png'
    not_image.write_text('plain text, not an image')
    swap = {'NOT_AN_IMAGE': str(not_image), 'MISSING': str(tmp_path / 'missing.png')}
    return [swap.get(str(a), str(a)) for a in argv]


@pytest.mark.parametrize('name,argv,message', BAD)
def test_bad_input_is_refused_in_one_line(tmp_path, capsys, name, argv, message):
    assert message in rejection(lambda: configured(name, *_bad_argv(argv, tmp_path)), capsys)


@pytest.mark.parametrize('name,argv', [('blended', ('--attack_test_blended_alpha', 2)),
                                       ('sig', ('--sig_delta', -1)), ('wanet', ('--k', 64))])
def test_bad_input_exits_2_with_one_line(tmp_path, name, argv):
    records = tmp_path / 'record'
    result = subprocess.run([sys.executable, f'./attack/{name}_attack.py', '--yaml_path',
                             f'../config/attack/{name}/cifar10.yaml', '--dataset_path', str(DATA),
                             '--record_root', str(records), '--save_folder_name', 'bad', *map(str, argv)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ONE_LINE_ERROR.match(lines[0])
    assert not records.exists()


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize('name', ['blended', 'sig', 'wanet'])
def test_cli_record_round_trip(tmp_path, cifar, name):
    records = tmp_path / 'record'
    result = subprocess.run([sys.executable, f'./attack/{name}_attack.py', '--yaml_path',
                             f'../config/attack/{name}/cifar10.yaml', '--dataset', 'cifar10',
                             '--dataset_path', str(DATA), '--save_folder_name', f'{name}_tiny',
                             '--model', 'mlp', '--epochs', '1', '--train_fraction', '0.02', '--test_fraction', '0.05',
                             '--record_root', str(records), '--device', 'cpu'],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = records / f'{name}_tiny'
    assert (folder / 'preview.png').stat().st_size > 0 and (folder / 'config.yaml').exists()
    record = torch.load(folder / 'attack_result.pt', map_location='cpu', weights_only=True)
    assert set(record) == RECORD_KEYS and record['attack'] == name
    assert record['clean_label'] == (name == 'sig')
    _, test = load_splits('cifar10', DATA, 0.02, 0.05, 0)
    bd_test, trigger = record['bd_test'], record['trigger']
    clean = test.images[bd_test['index']]
    assert bd_test['images'].dtype == torch.uint8 and len(bd_test['index']) == int((test.labels != 0).sum())
    if name == 'blended':
        rebuilt = blend(clean, trigger['pattern'], trigger['test_alpha'])
        assert trigger['train_alpha'] == trigger['test_alpha'] == 0.2
    elif name == 'sig':
        rebuilt = add_signal(clean, trigger['signal'])
        assert (trigger['delta'], trigger['f']) == (40.0, 6.0)
        assert bool((record['bd_train']['backdoor_labels'] == record['bd_train']['original_labels']).all())
    else:
        rebuilt = warp(clean, trigger['grid'])
        assert len(record['bd_train']['poison_index']) == round(0.1 * 1000)     # 2% of CIFAR-10's training set
        assert trigger['per_batch']
    assert torch.equal(rebuilt, bd_test['images'])
    for key in ('acc', 'asr', 'ra'):
        assert 0.0 <= record['metrics'][key] <= 1.0
