"""Datasets as uint8 tensors, class-balanced subsets and batched augmentation."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision

from utils import UserError
from utils.data import (augment, class_balanced_subset, dataset_spec, load_dataset, load_splits, to_float)

BATCHES = [name for name, _ in torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list]


# --------------------------------------------------------------------------- the real CIFAR-10
def test_cifar10_shapes_types_and_class_counts(cifar10):
    train, test = cifar10
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.images.dtype == test.images.dtype == torch.uint8
    assert train.labels.dtype == test.labels.dtype == torch.int64
    assert train.labels.shape == (50000,) and test.labels.shape == (10000,)
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    # real pixels, full range, images distinct
    assert train.images.min() == 0 and train.images.max() == 255
    assert not torch.equal(train.images[0], train.images[1])
    assert train.images.float().mean().item() == pytest.approx(0.4734 * 255, abs=3)


def test_cifar10_spec():
    spec = dataset_spec('cifar10')
    assert (spec.num_classes, spec.input_shape, spec.hflip) == (10, (3, 32, 32), True)
    with pytest.raises(UserError, match='unknown dataset'):
        dataset_spec('mnist')


@pytest.mark.parametrize('name', ['CIFAR10', 'CIFAR100'])
def test_cifar_checksum_table_matches_torchvisions(name):
    """utils/data keeps the official file list and md5 sums itself (reading needs no torchvision)."""
    from utils.data import CIFAR_FILES
    tv_class = getattr(torchvision.datasets, name)
    base, train_files, test_files = CIFAR_FILES[name]
    assert base == tv_class.base_folder
    assert train_files == dict(tv_class.train_list) and test_files == dict(tv_class.test_list)


def test_missing_dataset_names_where_it_looked(tmp_path, monkeypatch):
    calls = []

    def offline(self, *args, **kwargs):
        calls.append(self.root)
        raise RuntimeError('offline (no network in this test)')

    monkeypatch.setattr(torchvision.datasets.CIFAR10, 'download', offline)
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(UserError) as info:
        load_dataset('cifar10', empty)
    message = str(info.value)
    assert calls, 'the loader should try torchvision\'s download when the data is absent'
    assert str(empty) in message and str(empty / 'cifar-10-batches-py') in message
    assert 'offline' in message


def write_fake_cifar(folder, per_batch=3, seed=0):
    """A tiny CIFAR-10 in the official pickle layout: rows of 3072 bytes, R then G then B planes."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    content = {}
    for name in BATCHES:
        images = torch.randint(0, 256, (per_batch, 3, 32, 32), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (per_batch,), generator=g)
        batch = {'data': images.reshape(per_batch, -1).numpy(), 'labels': labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
        content[name] = (images, labels)
    return content


@pytest.mark.parametrize('layout', ['', 'cifar-10-batches-py', 'cifar10/cifar-10-batches-py'])
def test_reads_the_pickle_layout_exactly(tmp_path, layout):
    content = write_fake_cifar(tmp_path / layout if layout else tmp_path)
    with pytest.warns(UserWarning, match='md5'):
        train, test = load_dataset('cifar10', tmp_path)
    train_names = BATCHES[:5]
    assert torch.equal(train.images, torch.cat([content[n][0] for n in train_names]))
    assert torch.equal(train.labels, torch.cat([content[n][1] for n in train_names]))
    assert torch.equal(test.images, content['test_batch'][0])
    assert torch.equal(test.labels, content['test_batch'][1])


def test_corrupted_batch_is_a_user_error(tmp_path):
    write_fake_cifar(tmp_path / 'cifar-10-batches-py')
    (tmp_path / 'cifar-10-batches-py' / 'data_batch_3').write_bytes(b'not a pickle')
    with pytest.warns(UserWarning), pytest.raises(UserError, match='data_batch_3'):
        load_dataset('cifar10', tmp_path)


# --------------------------------------------------------------------------- subsets
def shuffled_labels(counts, seed=0):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_class_balanced_subset_counts_and_order():
    labels = shuffled_labels([10, 20, 7, 40])
    index = class_balanced_subset(labels, 0.3, seed=0)
    assert index.dtype == torch.int64
    assert torch.equal(index, torch.sort(index).values) and len(torch.unique(index)) == len(index)
    assert torch.bincount(labels[index]).tolist() == [3, 6, 2, 12]


def test_class_balanced_subset_keeps_one_per_class():
    labels = shuffled_labels([10, 20, 7])
    assert torch.bincount(labels[class_balanced_subset(labels, 0.001, seed=0)]).tolist() == [1, 1, 1]
    assert torch.equal(class_balanced_subset(labels, 1.0, seed=0), torch.arange(len(labels)))


def test_class_balanced_subset_is_seeded():
    labels = shuffled_labels([50, 50, 50])
    first = class_balanced_subset(labels, 0.2, seed=7)
    assert torch.equal(first, class_balanced_subset(labels, 0.2, seed=7))
    assert not torch.equal(first, class_balanced_subset(labels, 0.2, seed=8))


@pytest.mark.parametrize('fractions', [(0.0, 1.0), (1.5, 1.0), (1.0, 0.0), (1.0, -0.1)])
def test_load_splits_checks_fractions_before_loading(tmp_path, fractions):
    with pytest.raises(UserError, match='fraction'):
        load_splits('cifar10', tmp_path / 'never-read', *fractions)
    assert not (tmp_path / 'never-read').exists()


def test_load_splits_subsets(reload_splits, cifar10, cifar10_dir):
    train, test = reload_splits({'dataset': 'cifar10', 'dataset_path': str(cifar10_dir), 'train_fraction': 0.01,
                                 'test_fraction': 0.02, 'random_seed': 3})
    assert torch.bincount(train.labels).tolist() == [50] * 10
    assert torch.bincount(test.labels).tolist() == [20] * 10
    full_train, full_test = cifar10
    train_index = class_balanced_subset(full_train.labels, 0.01, 3)
    assert torch.equal(train.images, full_train.images[train_index])
    assert torch.equal(train.labels, full_train.labels[train_index])
    # the same call gives the same images (records store indices into these subsets)
    again, _ = reload_splits({'dataset': 'cifar10', 'dataset_path': str(cifar10_dir), 'train_fraction': 0.01,
                              'test_fraction': 0.02, 'random_seed': 3})
    assert torch.equal(again.images, train.images)


# --------------------------------------------------------------------------- augmentation
def test_to_float():
    images = torch.tensor([[[[0, 51, 255]]]], dtype=torch.uint8)
    out = to_float(images)
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor([[[[0.0, 0.2, 1.0]]]]))
    assert images.dtype == torch.uint8  # the uint8 input is not modified


def crop_matches(image, padded, h, w, span):
    """Every (dy, dx, flipped) whose crop of ``padded`` equals ``image``."""
    found = []
    for dy in range(span):
        for dx in range(span):
            crop = padded[:, dy:dy + h, dx:dx + w]
            for flipped in (False, True):
                if torch.equal(image, crop.flip(2) if flipped else crop):
                    found.append((dy, dx, flipped))
    return found


@pytest.mark.parametrize('hflip', [True, False])
def test_augment_is_a_padded_crop_and_horizontal_flip(hflip):
    n, c, h, w, pad = 200, 2, 6, 5, 2    # not square, so rows and columns cannot be confused
    base = (torch.arange(c * h * w, dtype=torch.float32) + 1).reshape(c, h, w) / 1000   # distinct, non-zero
    out = augment(base.expand(n, c, h, w).clone(), torch.Generator().manual_seed(0), hflip=hflip, padding=pad)
    assert out.shape == (n, c, h, w)
    padded = F.pad(base, (pad, pad, pad, pad))
    offsets, flips = set(), []
    for image in out:
        found = crop_matches(image, padded, h, w, 2 * pad + 1)
        assert len(found) == 1, 'each output must be exactly one crop of the zero-padded image, maybe flipped'
        offsets.add(found[0][:2])
        flips.append(found[0][2])
    assert len(offsets) == (2 * pad + 1) ** 2             # every shift in [-pad, pad]^2 occurs
    if hflip:
        assert 0.3 < sum(flips) / n < 0.7
    else:
        assert not any(flips)


def test_augment_flips_a_hand_made_image():
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 1, 0] = 1.0                                  # one lit pixel at row 1, column 0
    outs = augment(image.expand(64, 1, 4, 4).clone(), torch.Generator().manual_seed(1), hflip=True, padding=0)
    lit = {tuple(torch.nonzero(o[0]).flatten().tolist()) for o in outs}
    assert lit == {(1, 0), (1, 3)}                           # kept or mirrored left-right, never moved up/down


def test_augment_keeps_range_and_is_deterministic(cifar10):
    images = to_float(cifar10[0].images[:64])
    first = augment(images, torch.Generator().manual_seed(5), hflip=True)
    assert first.shape == images.shape and first.dtype == torch.float32
    assert first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(5), hflip=True))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(6), hflip=True))
    assert torch.equal(images, to_float(cifar10[0].images[:64]))   # the input is not modified


# --------------------------------------------------------------------------- CIFAR-100 and GTSRB, on synthetic files
def test_cifar100_reads_the_fine_labels_of_its_pickle_layout(tmp_path):
    folder = tmp_path / 'cifar100' / 'cifar-100-python'
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    written = {}
    for name, count in (('train', 5), ('test', 3)):
        images = torch.randint(0, 256, (count, 3, 32, 32), generator=g, dtype=torch.uint8)
        fine = torch.randint(0, 100, (count,), generator=g)
        batch = {'data': images.reshape(count, -1).numpy(), 'fine_labels': fine.tolist(),
                 'coarse_labels': (fine // 5).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
        written[name] = (images, fine)
    with pytest.warns(UserWarning, match='md5'):
        train, test = load_dataset('cifar100', tmp_path)
    for split, name in ((train, 'train'), (test, 'test')):
        assert torch.equal(split.images, written[name][0]) and torch.equal(split.labels, written[name][1])
    assert dataset_spec('cifar100').num_classes == 100


def write_fake_gtsrb(root, sizes=((40, 31), (15, 15), (250, 120)), classes=(0, 42)):
    """torchvision's GTSRB layout under ``root/gtsrb``: one solid-colour .ppm per class and size (the
    real images range from 15x15 to 250x250 pixels), the test images listed in GT-final_test.csv."""
    from PIL import Image
    base = root / 'gtsrb'
    rows, expected = ['Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId'], {'train': [], 'test': []}
    for label in classes:
        colour = (label * 6, 255 - label * 6, 7 + label)
        for index, (width, height) in enumerate(sizes):
            image = Image.new('RGB', (width, height), colour)
            train_folder = base / 'GTSRB' / 'Training' / f'{label:05d}'
            train_folder.mkdir(parents=True, exist_ok=True)
            image.save(train_folder / f'00000_{index:05d}.ppm')
            test_folder = base / 'GTSRB' / 'Final_Test' / 'Images'
            test_folder.mkdir(parents=True, exist_ok=True)
            filename = f'{label:03d}{index:02d}.ppm'
            image.save(test_folder / filename)
            rows.append(f'{filename};{width};{height};0;0;{width - 1};{height - 1};{label}')
            expected['train'].append((label, colour))
            expected['test'].append((label, colour))
    (base / 'GT-final_test.csv').write_text('\n'.join(rows) + '\n')
    return expected


@pytest.mark.parametrize('torchvision_root', ['', 'gtsrb'])   # data/gtsrb/GTSRB and data/gtsrb/gtsrb/GTSRB
def test_gtsrb_reads_torchvisions_layout_resized_to_32(tmp_path, torchvision_root, monkeypatch):
    def offline(*args, **kwargs):
        raise AssertionError('the images are there: nothing should be downloaded')

    monkeypatch.setattr(torchvision.datasets.gtsrb, 'download_and_extract_archive', offline)
    expected = write_fake_gtsrb(tmp_path / torchvision_root)
    train, test = load_dataset('gtsrb', tmp_path)
    for split, name in ((train, 'train'), (test, 'test')):
        assert split.images.shape == (len(expected[name]), 3, 32, 32) and split.images.dtype == torch.uint8
        got = sorted((int(label), tuple(image[:, 16, 16].tolist())) for image, label in zip(split.images, split.labels))
        assert got == sorted(expected[name])
        # a solid image stays solid through the resize, whatever its size
        assert all(torch.equal(image, image[:, :1, :1].expand_as(image)) for image in split.images)
    spec = dataset_spec('gtsrb')
    assert (spec.num_classes, spec.hflip) == (43, False)   # signs are not mirror-symmetric


def test_gtsrb_missing_is_one_line_naming_where_it_looked(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError('offline (no network in this test)')

    monkeypatch.setattr(torchvision.datasets.gtsrb, 'download_and_extract_archive', offline)
    with pytest.raises(UserError) as info:
        load_dataset('gtsrb', tmp_path)
    message = str(info.value)
    assert '\n' not in message and str(tmp_path / 'gtsrb' / 'GTSRB') in message and 'offline' in message
