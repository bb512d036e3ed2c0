"""Datasets as in-memory uint8 tensors, class-balanced subsets and batched augmentation."""
from __future__ import annotations

import csv
import hashlib
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import UserError


@dataclass
class Split:
    """A dataset split: ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,)."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> 'Split':
        return Split(self.images[index], self.labels[index])


@dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # whether horizontal flips keep an image's class
    load: Callable[[Path], tuple[Split, Split]]


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, **spec):
    def wrap(load):
        DATASETS[name] = DatasetSpec(load=load, **spec)
        return load
    return wrap


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f'unknown dataset {name!r} (known: {", ".join(sorted(DATASETS))})')
    return DATASETS[name]


def load_dataset(name: str, path: str | Path) -> tuple[Split, Split]:
    """(train, test) splits of dataset ``name`` found under ``path`` (downloaded there when absent)."""
    return dataset_spec(name).load(Path(path))


# --------------------------------------------------------------------------- CIFAR
def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _read_cifar_batches(folder: Path, files: list[str], label_key: str) -> Split:
    images, labels = [], []
    for name in files:
        try:
            with open(folder / name, 'rb') as handle:
                batch = pickle.load(handle, encoding='latin1')
            images.append(np.asarray(batch['data'], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
            raise UserError(f'{folder / name}: unreadable dataset batch ({exc})') from None
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def write_cifar_batch(split: Split, path: Path, batch_label: str) -> None:
    """``split`` as one batch file of the standard CIFAR-10 pickle layout (what :func:`_read_cifar_batches` reads)."""
    entry = {'batch_label': batch_label, 'labels': split.labels.tolist(),
             'data': split.images.reshape(len(split), -1).numpy(), 'filenames': [f'{i}.png' for i in range(len(split))]}
    with open(path, 'wb') as handle:
        pickle.dump(entry, handle, protocol=4)


# The official archives' files and md5 sums (the same table torchvision.datasets.CIFAR10/100 check);
# kept here so that reading a local copy does not import torchvision (about 2 s per process).
CIFAR_FILES = {
    'CIFAR10': ('cifar-10-batches-py',
                {'data_batch_1': 'c99cafc152244af753f735de768cd75f', 'data_batch_2': 'd4bba439e000b95fd0a9bffe97cbabec',
                 'data_batch_3': '54ebc095f3ab1f0389bbae665268c751', 'data_batch_4': '634d18415352ddfa80567beed471001a',
                 'data_batch_5': '482c414d41f54cd18b22e5b47cb7c3cb'},
                {'test_batch': '40351d587109b95175f43aff81a1287e'}),
    'CIFAR100': ('cifar-100-python', {'train': '16019d7e3df5f24257cddd939b257f8d'},
                 {'test': 'f0ef6b0ae62326f3e7ffdfab6717acfc'}),
}


def _describe(exc: Exception) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc)
    return f'{type(exc).__name__}: {text.splitlines()[0] if text else ""}'


def _download_cifar(tv_class_name: str, target: Path, candidates: list[Path]) -> None:
    """Download through torchvision into ``target``; a one-line error when that fails."""
    import torchvision.datasets as tvd
    tv_class = getattr(tvd, tv_class_name)
    try:
        tv_class(str(target), train=True, download=True)
        tv_class(str(target), train=False, download=True)
    except Exception as exc:  # no network, no permission, interrupted download ...
        looked = ', '.join(str(c) for c in dict.fromkeys(candidates))
        raise UserError(f'{tv_class_name} not found (looked in {looked}) and the download into {target} '
                        f'failed ({_describe(exc)})') from None


def _cifar_candidates(path: Path, tv_class_name: str) -> list[Path]:
    base = CIFAR_FILES[tv_class_name][0]
    return [path, path / base, path / tv_class_name.lower() / base]


def cifar_folder(path: Path, tv_class_name: str = 'CIFAR10') -> Optional[Path]:
    """The folder holding every batch file of the standard pickle layout, looked for as the loader
    does (``path``, ``path/cifar-10-batches-py``, ``path/cifar10/cifar-10-batches-py``); None if absent."""
    _, train_files, test_files = CIFAR_FILES[tv_class_name]
    return next((c for c in _cifar_candidates(path, tv_class_name)
                 if all((c / f).is_file() for f in {**train_files, **test_files})), None)


def _load_cifar(path: Path, tv_class_name: str, label_key: str) -> tuple[Split, Split]:
    """Read the standard pickle layout directly; checksums are checked against the official archive's
    and a mismatch is a warning (a reordered but pixel-exact copy is still valid data)."""
    base, train_files, test_files = CIFAR_FILES[tv_class_name]
    expected = {**train_files, **test_files}
    folder = cifar_folder(path, tv_class_name)
    if folder is None:
        target = path / tv_class_name.lower()
        _download_cifar(tv_class_name, target, _cifar_candidates(path, tv_class_name))
        folder = target / base
    mismatched = [f for f, md5 in expected.items() if _md5(folder / f) != md5]
    if mismatched:
        warnings.warn(f'{folder}: md5 of {", ".join(mismatched)} differs from the official archive; '
                      'reading the batches directly (expected for a reordered copy)', stacklevel=2)
    train = _read_cifar_batches(folder, list(train_files), label_key)
    test = _read_cifar_batches(folder, list(test_files), label_key)
    return train, test


@register_dataset('cifar10', num_classes=10, input_shape=(3, 32, 32),
                  mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), hflip=True)
def load_cifar10(path: Path) -> tuple[Split, Split]:
    return _load_cifar(path, 'CIFAR10', 'labels')


@register_dataset('cifar100', num_classes=100, input_shape=(3, 32, 32),
                  mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), hflip=True)
def load_cifar100(path: Path) -> tuple[Split, Split]:
    return _load_cifar(path, 'CIFAR100', 'fine_labels')


@register_dataset('gtsrb', num_classes=43, input_shape=(3, 32, 32),
                  mean=(0.3403, 0.3121, 0.3214), std=(0.2724, 0.2608, 0.2669), hflip=False)
def load_gtsrb(path: Path) -> tuple[Split, Split]:
    """GTSRB in torchvision's layout (``path/gtsrb/GTSRB/Training/<class>/*.ppm``, the test images in
    ``Final_Test/Images`` with ``GT-final_test.csv``; downloaded there when absent), every image resized
    to 32x32. ``path/gtsrb/gtsrb/...`` (torchvision pointed at ``path/gtsrb``) is read too."""
    import torchvision.datasets as tvd
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor, resize

    candidates = [path, path / 'gtsrb']   # torchvision's root: it adds 'gtsrb' itself
    root = next((c for c in candidates if (c / 'gtsrb' / 'GTSRB').is_dir()), path)
    base = root / 'gtsrb'
    image_folders = {'train': base / 'GTSRB' / 'Training', 'test': base / 'GTSRB' / 'Final_Test' / 'Images'}

    def samples(split: str) -> list[tuple[Path, int]]:
        """Every image with its class: a training image's class is its folder's number (00000 to
        00042), not its folder's rank, so a copy missing a class keeps the others' labels."""
        if split == 'train':
            files = sorted(image_folders['train'].glob('*/*.ppm'))
            if not all(f.parent.name.isdigit() for f in files):
                raise UserError(f'{image_folders["train"]}: class folders must be numbers (00000 to 00042)')
            return [(f, int(f.parent.name)) for f in files]
        with open(base / 'GT-final_test.csv', newline='') as handle:
            return [(image_folders['test'] / row['Filename'], int(row['ClassId']))
                    for row in csv.DictReader(handle, delimiter=';', skipinitialspace=True)]

    def read(split: str) -> Split:
        try:
            if not image_folders[split].is_dir():   # torchvision downloads the split into root/gtsrb
                tvd.GTSRB(str(root), split=split, download=True)
            listed = samples(split)
            images = [resize(pil_to_tensor(Image.open(f).convert('RGB')), [32, 32], antialias=True) for f, _ in listed]
        except UserError:
            raise
        except Exception as exc:  # no network, a partial copy, an unreadable image ...
            looked = ', '.join(str(c / 'gtsrb' / 'GTSRB') for c in candidates)
            raise UserError(f'GTSRB {split} split not readable (looked in {looked}; download into {base}): '
                            f'{_describe(exc)}') from None
        labels = torch.tensor([label for _, label in listed], dtype=torch.int64)
        if not listed or labels.min() < 0 or labels.max() > 42:
            raise UserError(f'GTSRB {split} split in {base}: no images, or classes outside 0 to 42')
        return Split(torch.stack(images), labels)

    return read('train'), read('test')


# --------------------------------------------------------------------------- subsets
def class_balanced_subset(labels: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """Sorted indices of ``round(ratio * n_c)`` seeded-random samples from every class c."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        count = max(1, int(round(ratio * len(members))))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.sort(torch.cat(chosen)).values


def load_splits(name: str, path: str | Path, train_fraction: float = 1.0, test_fraction: float = 1.0,
                seed: int = 0) -> tuple[Split, Split]:
    """``load_dataset`` reduced to class-balanced, seeded fractions (for quick runs and tests).
    Attacks and the defenses that reload a record's clean data both call this, with the same
    values, so indices stored in a record always refer to the same images."""
    for label, fraction in (('train_fraction', train_fraction), ('test_fraction', test_fraction)):
        if not 0 < fraction <= 1:
            raise UserError(f'{label} must lie in (0, 1], got {fraction}')
    train, test = load_dataset(name, path)
    if train_fraction < 1:
        train = train.subset(class_balanced_subset(train.labels, train_fraction, seed))
    if test_fraction < 1:
        test = test.subset(class_balanced_subset(test.labels, test_fraction, seed + 1))
    return train, test


# --------------------------------------------------------------------------- augmentation
def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1]."""
    return images.float().div_(255)


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; to a GPU through pinned memory without waiting, since a plain
    copy from pageable memory makes the CPU wait for all queued GPU work."""
    if device.type != 'cuda':
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def augment(images: torch.Tensor, generator: torch.Generator, hflip: bool, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, batched on ``images``' device.

    ``images`` is float (N, C, H, W); the random draws come from ``generator`` (on the CPU) so
    a run is reproducible on any device."""
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = _to_device(torch.randint(0, 2 * padding + 1, (n,), generator=generator), device)
    dx = _to_device(torch.randint(0, 2 * padding + 1, (n,), generator=generator), device)
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    out = padded[batch, channel, rows, cols]
    if hflip:
        flip = _to_device(torch.rand(n, generator=generator) < 0.5, device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out
