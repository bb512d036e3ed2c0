"""Carry all of CIFAR-10 to a machine that only accepts small transfers (a lent GPU takes 64 MiB a
call; the pickles are 178 MiB): ``pack`` stores each batch file as one lossless WebP mosaic (a
100 x 100 grid of the 32 x 32 images, about 16 MiB per 10,000 images) with its labels, split into
parts that travel one per call; ``unpack`` writes the standard pickle layout back, pixel for pixel.

    python bench/cifar_pack.py pack --dataset_path ../shared/data/cifar10 --out .gpu_full --parts 2
    python bench/cifar_pack.py unpack --packed .gpu_full --out .gpu_full/cifar10   # on the GPU machine

``pack`` checks its own output by decoding every mosaic again before it reports success.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import argparse
import json
import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

from utils import REPO_ROOT
from utils.config import UserError, positive_int, run_main
from utils.data import Split, cifar_folder, write_cifar_batch

BATCHES = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
SIDE = 32


def mosaic(data: np.ndarray) -> np.ndarray:
    """(N, 3072) CHW rows -> one (rows * 32, 100 * 32, 3) image, 100 images to a row (N a multiple of 100)."""
    rows = len(data) // 100
    images = data.reshape(rows, 100, 3, SIDE, SIDE).transpose(0, 3, 1, 4, 2)   # row, y, column, x, channel
    return np.ascontiguousarray(images.reshape(rows * SIDE, 100 * SIDE, 3))


def unmosaic(picture: np.ndarray) -> np.ndarray:
    rows = picture.shape[0] // SIDE
    images = picture.reshape(rows, SIDE, 100, SIDE, 3).transpose(0, 2, 4, 1, 3)
    return np.ascontiguousarray(images.reshape(rows * 100, 3 * SIDE * SIDE))


def pack_one(source: Path, name: str, target: Path) -> dict:
    with open(source / name, 'rb') as handle:
        batch = pickle.load(handle, encoding='latin1')
    data = np.asarray(batch['data'], dtype=np.uint8)
    if len(data) % 100:
        raise UserError(f'{source / name}: {len(data)} images, not a multiple of 100')
    Image.fromarray(mosaic(data)).save(target / f'{name}.webp', format='WEBP', lossless=True, quality=100, method=6)
    with Image.open(target / f'{name}.webp') as check:
        if not np.array_equal(unmosaic(np.asarray(check.convert('RGB'))), data):
            raise UserError(f'{target / name}.webp does not decode to the images it was made from')
    return {'batch_label': batch.get('batch_label', name), 'labels': list(map(int, batch['labels']))}


def pack(args) -> None:
    source = cifar_folder(Path(args.dataset_path))
    if source is None or not (source / 'batches.meta').is_file():
        raise UserError(f'{args.dataset_path}: no complete CIFAR-10 batches folder (cifar-10-batches-py with its batches.meta)')
    out = Path(args.out)
    parts = [BATCHES[i::args.parts] for i in range(args.parts)]
    targets = {name: out / f'part{i + 1}' for i, names in enumerate(parts) for name in names}
    for target in set(targets.values()):
        target.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.workers) as pool:
        labels = dict(zip(BATCHES, pool.map(pack_one, [source] * len(BATCHES), BATCHES, [targets[n] for n in BATCHES])))
    for name, target in targets.items():   # each part carries its own batches' labels, the first the meta file
        (target / f'{name}.json').write_text(json.dumps(labels[name]))
    (out / 'part1' / 'batches.meta').write_bytes((source / 'batches.meta').read_bytes())
    for target in sorted(set(targets.values())):
        size = sum(f.stat().st_size for f in target.iterdir())
        print(f'{target}: {size / 2 ** 20:.1f} MiB ({", ".join(sorted(f.stem for f in target.glob("*.webp")))})')


def unpack(args) -> None:
    packed = Path(args.packed)
    folder = Path(args.out) / 'cifar-10-batches-py'
    folder.mkdir(parents=True, exist_ok=True)
    found = {path.stem: path for path in packed.glob('part*/*.webp')}
    metas = sorted(packed.glob('part*/batches.meta'))
    missing = [name for name in BATCHES if name not in found] + ([] if metas else ['batches.meta'])
    if missing:
        raise UserError(f'{packed}: no {", ".join(missing)} in its parts (carry every part)')
    for name in BATCHES:
        meta = json.loads(found[name].with_suffix('.json').read_text())
        with Image.open(found[name]) as picture:
            images = torch.from_numpy(unmosaic(np.asarray(picture.convert('RGB')))).view(-1, 3, SIDE, SIDE)
        write_cifar_batch(Split(images, torch.tensor(meta['labels'], dtype=torch.int64)), folder / name, meta['batch_label'])
    (folder / 'batches.meta').write_bytes(metas[0].read_bytes())
    print(f'{len(BATCHES)} batches written to {folder}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    packing = commands.add_parser('pack', help='pickles -> lossless WebP mosaics in --parts folders')
    packing.add_argument('--dataset_path', default=str(REPO_ROOT / 'data'), help='CIFAR-10, found as the loader finds it')
    packing.add_argument('--out', required=True)
    packing.add_argument('--parts', type=positive_int, default=2, help='folders to split the batches over (one per transfer)')
    packing.add_argument('--workers', type=positive_int, default=2, help='processes encoding at once')
    unpacking = commands.add_parser('unpack', help='WebP mosaics -> the standard pickle layout')
    unpacking.add_argument('--packed', required=True, help='folder holding part1/, part2/, ...')
    unpacking.add_argument('--out', required=True, help='folder to receive cifar-10-batches-py/')
    args = parser.parse_args(argv)
    pack(args) if args.command == 'pack' else unpack(args)


if __name__ == '__main__':
    sys.exit(run_main(main))
