"""BadNets trigger pixels and the poisoned splits (indices, labels, bounds)."""
from __future__ import annotations

from argparse import Namespace

import pytest
import torch
from PIL import Image

from attack.badnet_attack import BadNet
from conftest import REPO_ROOT, rejection
from utils import UserError
from utils.config import parse_config
from utils.data import Split, dataset_spec
from utils.poison import (PoisonedSet, backdoor_labels, check_attack_labels, choose_poison_index,
                          poisoned_training_split)

SPEC = dataset_spec('cifar10')
SCRIPT = str(REPO_ROOT / 'attack' / 'badnet_attack.py')


def random_images(n=6, seed=0, high=255):
    """uint8 images that never contain the value ``high`` (so a stamped pixel is always visible)."""
    return torch.randint(0, high, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def badnet(argv=()):
    attack = BadNet()
    args = parse_config(attack.build_parser(SCRIPT), list(argv))
    attack.setup(args, SPEC)
    return attack, args


# --------------------------------------------------------------------------- trigger pixels
@pytest.mark.parametrize('argv', [[], ['--yaml_path', str(REPO_ROOT / 'config' / 'attack' / 'badnet' / 'cifar10.yaml')]])
def test_default_trigger_is_a_white_3x3_patch_bottom_right(argv):
    attack, _ = badnet(argv)
    images = random_images()
    before = images.clone()
    out = attack.apply_trigger(images, train=False)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(images, before)                      # the clean tensor is untouched
    expected = images.clone()
    expected[:, :, 29:32, 29:32] = 255
    assert torch.equal(out, expected)
    assert (out != images).sum() == 6 * 3 * 9               # exactly those 27 values per image changed


@pytest.mark.parametrize('position, rows, cols', [
    ('top_left', slice(0, 4), slice(0, 4)), ('top_right', slice(0, 4), slice(28, 32)),
    ('bottom_left', slice(28, 32), slice(0, 4)), ('bottom_right', slice(28, 32), slice(28, 32)),
])
def test_patch_positions_sizes_and_values(position, rows, cols):
    attack, _ = badnet(['--patch_position', position, '--patch_size', '4', '--patch_value', '7'])
    images = random_images(high=7)
    expected = images.clone()
    expected[:, :, rows, cols] = 7
    assert torch.equal(attack.apply_trigger(images, train=False), expected)


def test_patch_mask_image_stamps_its_non_black_pixels(tmp_path):
    pattern = torch.zeros(3, 32, 32, dtype=torch.uint8)
    pattern[:, 2, 5] = torch.tensor([255, 0, 0])      # a red pixel: the G and B zeros are stamped too
    pattern[:, 10, 10] = torch.tensor([0, 0, 7])
    pattern[:, 31, 0] = torch.tensor([1, 1, 1])
    path = tmp_path / 'trigger.png'
    Image.fromarray(pattern.permute(1, 2, 0).numpy(), 'RGB').save(path)
    attack, _ = badnet(['--patch_mask_path', str(path)])
    images = random_images(high=255) | 1                  # no zero pixels anywhere
    out = attack.apply_trigger(images, train=False)
    expected = images.clone()
    for r, c in ((2, 5), (10, 10), (31, 0)):
        expected[:, :, r, c] = pattern[:, r, c]
    assert torch.equal(out, expected)


def test_patch_mask_image_is_resized_nearest(tmp_path):
    small = torch.zeros(16, 16, 3, dtype=torch.uint8)
    small[0, 0] = 200
    path = tmp_path / 'small.png'
    Image.fromarray(small.numpy(), 'RGB').save(path)
    attack, _ = badnet(['--patch_mask_path', str(path)])
    images = random_images(high=200)
    expected = images.clone()
    expected[:, :, 0:2, 0:2] = 200
    assert torch.equal(attack.apply_trigger(images, train=False), expected)


@pytest.mark.parametrize('argv, message', [
    (['--patch_size', '0'], 'patch_size'), (['--patch_size', '33'], 'patch_size'),
    (['--patch_value', '256'], 'patch_value'), (['--patch_value', '-1'], 'patch_value'),
])
def test_bad_patch_options(argv, message, capsys):
    assert message in rejection(lambda: badnet(argv), capsys)


def test_unreadable_trigger_image(tmp_path):
    (tmp_path / 'bad.png').write_bytes(b'not a png')
    with pytest.raises(UserError, match='trigger image'):
        badnet(['--patch_mask_path', str(tmp_path / 'bad.png')])
    with pytest.raises(UserError, match='trigger image'):
        badnet(['--patch_mask_path', str(tmp_path / 'absent.png')])


# --------------------------------------------------------------------------- poisoned splits
def clean_split(n=200, classes=10, seed=0):
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return Split(random_images(n, seed), labels)


def poison_args(**overrides):
    values = dict(attack_target=0, attack_label_trans='all2one', pratio=0.1, random_seed=0)
    return Namespace(**(values | overrides))


@pytest.mark.parametrize('pratio', [0.0, 0.05, 0.1, 0.37, 0.9])
def test_poison_train_all2one(pratio):
    attack, _ = badnet()
    clean = clean_split()
    before = clean.images.clone()
    poisoned = attack.poison_train(clean, poison_args(pratio=pratio), SPEC)
    assert len(poisoned) == round(pratio * len(clean))
    assert poisoned.index.dtype == torch.int64
    assert torch.equal(poisoned.index, torch.sort(poisoned.index).values)
    assert len(torch.unique(poisoned.index)) == len(poisoned)
    assert not (clean.labels[poisoned.index] == 0).any()          # never an image already of the target
    assert torch.equal(poisoned.original_labels, clean.labels[poisoned.index])
    assert (poisoned.backdoor_labels == 0).all()
    assert torch.equal(poisoned.images, attack.apply_trigger(clean.images[poisoned.index], train=True))
    assert torch.equal(clean.images, before)


def test_poison_index_is_seeded():
    attack, _ = badnet()
    clean = clean_split()
    first = attack.poison_train(clean, poison_args(random_seed=1), SPEC).index
    assert torch.equal(first, attack.poison_train(clean, poison_args(random_seed=1), SPEC).index)
    assert not torch.equal(first, attack.poison_train(clean, poison_args(random_seed=2), SPEC).index)


def test_choose_poison_index():
    labels = torch.arange(1000) % 10
    candidates = torch.nonzero(labels != 3).flatten()
    index = choose_poison_index(labels, 0.123, candidates, seed=0)
    assert len(index) == 123 and set(index.tolist()) <= set(candidates.tolist())
    with pytest.raises(UserError, match='eligible'):
        choose_poison_index(labels, 0.95, candidates, seed=0)       # 950 asked, 900 eligible


def test_poison_test_all2one_excludes_the_target_class():
    attack, _ = badnet()
    test = clean_split(n=100, seed=3)
    poisoned = attack.poison_test(test, poison_args(attack_target=4), SPEC)
    assert torch.equal(poisoned.index, torch.nonzero(test.labels != 4).flatten())
    assert len(poisoned) == 90 and not (poisoned.original_labels == 4).any()
    assert (poisoned.backdoor_labels == 4).all()
    assert torch.equal(poisoned.images, attack.apply_trigger(test.images[poisoned.index], train=False))


def test_all2all_labels():
    attack, _ = badnet()
    clean = clean_split()
    args = poison_args(attack_label_trans='all2all', pratio=0.25)
    poisoned = attack.poison_train(clean, args, SPEC)
    assert len(poisoned) == 50
    assert torch.equal(poisoned.backdoor_labels, (poisoned.original_labels + 1) % 10)
    assert (poisoned.original_labels == 0).any()                  # all2all may poison every class
    test = attack.poison_test(clean, args, SPEC)
    assert torch.equal(test.index, torch.arange(len(clean)))
    assert torch.equal(test.backdoor_labels, (clean.labels + 1) % 10)
    assert torch.equal(backdoor_labels(torch.tensor([0, 8, 9]), 0, 'all2all', 10), torch.tensor([1, 9, 0]))


@pytest.mark.parametrize('target, trans, pratio, message', [
    (0, 'all2one', -0.01, 'pratio'), (0, 'all2one', 1.01, 'pratio'),
    (-1, 'all2one', 0.1, 'attack_target'), (10, 'all2one', 0.1, 'attack_target'),
    (0, 'one2one', 0.1, 'attack_label_trans'),
])
def test_attack_label_checks(target, trans, pratio, message):
    with pytest.raises(UserError, match=message):
        check_attack_labels(target, trans, pratio, 10)


@pytest.mark.parametrize('target, pratio', [(0, 0.0), (9, 1.0), (5, 0.5)])
def test_attack_label_checks_accept_the_bounds(target, pratio):
    check_attack_labels(target, 'all2one', pratio, 10)


def test_poisoned_training_split_swaps_in_the_poisoned_samples():
    attack, _ = badnet()
    clean = clean_split()
    before_images, before_labels = clean.images.clone(), clean.labels.clone()
    poisoned = attack.poison_train(clean, poison_args(attack_target=2), SPEC)
    mixed = poisoned_training_split(clean, poisoned)
    assert torch.equal(clean.images, before_images) and torch.equal(clean.labels, before_labels)
    rest = torch.ones(len(clean), dtype=torch.bool)
    rest[poisoned.index] = False
    assert torch.equal(mixed.images[poisoned.index], poisoned.images)
    assert (mixed.labels[poisoned.index] == 2).all()
    assert torch.equal(mixed.images[rest], clean.images[rest]) and torch.equal(mixed.labels[rest], clean.labels[rest])


def test_poisoned_set_record_round_trip():
    poisoned = PoisonedSet(torch.tensor([1, 4]), torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                           torch.tensor([3, 5]), torch.tensor([0, 0]))
    entry = poisoned.to_record('poison_index')
    assert set(entry) == {'poison_index', 'images', 'original_labels', 'backdoor_labels'}
    again = PoisonedSet.from_record(entry, 'poison_index')
    assert all(torch.equal(getattr(again, f), getattr(poisoned, f))
               for f in ('index', 'images', 'original_labels', 'backdoor_labels'))
