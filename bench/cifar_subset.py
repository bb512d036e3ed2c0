"""Write a class-balanced CIFAR-10 subset in the standard pickle layout (five training batches and a
test batch, as the official archive), small enough to travel to a machine without the dataset, e.g.
a lent GPU (bench/gpu_check.sh). The toolkit reads it like the full copy, warning that the checksums
differ from the official archive.

    python bench/cifar_subset.py --out .gpu_data/cifar10 --train 15000 --test 3000
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import argparse
import pickle

import torch

from utils import REPO_ROOT
from utils.config import positive_int, run_main
from utils.data import class_balanced_subset, load_dataset, write_cifar_batch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset_path', default=str(REPO_ROOT / 'data'))
    parser.add_argument('--out', required=True, help='folder to receive cifar-10-batches-py/')
    parser.add_argument('--train', type=positive_int, default=15000)
    parser.add_argument('--test', type=positive_int, default=3000)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    train, test = load_dataset('cifar10', args.dataset_path)
    train = train.subset(class_balanced_subset(train.labels, min(1.0, args.train / len(train)), args.seed))
    test = test.subset(class_balanced_subset(test.labels, min(1.0, args.test / len(test)), args.seed))
    folder = Path(args.out) / 'cifar-10-batches-py'
    folder.mkdir(parents=True, exist_ok=True)
    for i, index in enumerate(torch.arange(len(train)).chunk(5)):
        write_cifar_batch(train.subset(index), folder / f'data_batch_{i + 1}', f'training batch {i + 1} of 5')
    write_cifar_batch(test, folder / 'test_batch', 'testing batch 1 of 1')
    names = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    with open(folder / 'batches.meta', 'wb') as handle:
        pickle.dump({'label_names': names, 'num_cases_per_batch': len(train) // 5, 'num_vis': 3072}, handle)
    print(f'{len(train)} training and {len(test)} test images in {folder}')


if __name__ == '__main__':
    sys.exit(run_main(main))
