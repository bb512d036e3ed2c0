"""What an LC model learned: the trigger, or the adversarial perturbation it was trained on?

LC (Turner et al. 2019) perturbs target-class training images so that the model must lean on the
trigger. When every target image is perturbed and the perturbations come from a standard model,
the perturbation itself can be the feature the model learns. This prints, for an LC record, how
often its model answers the target class on the poisoned training images as trained, on the same
images with the trigger's pixels restored to the clean image (perturbation only), on their clean
originals with and without the trigger, and on the clean test images of the target class.

    python bench/lc_shortcut.py --result_file lc_cifar10
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import argparse

import torch

from attack.lc_attack import add_trigger
from utils import REPO_ROOT, UserError
from utils.config import resolve_device, run_main
from utils.defense import record_splits
from utils.evaluate import predict
from utils.record import load_attack_record, load_record_model, record_folder


def target_rates(record: dict, train, test, device) -> dict[str, float]:
    """Fraction of each image set the record's model assigns to the target class."""
    model = load_record_model(record).to(device).eval()
    trigger, poisoned = record['trigger'], record['bd_train']
    target = int(record['attack_config']['attack_target'])
    clean = train.images[poisoned['poison_index']]
    in_trigger = (trigger['pattern'] != 0).expand_as(clean)
    sets = {'poisoned training images, as trained': poisoned['images'],
            'the same, trigger pixels restored (perturbation only)': torch.where(in_trigger, clean, poisoned['images']),
            'their clean originals': clean,
            'their clean originals with the trigger': add_trigger(clean, trigger['pattern'], trigger['amplitude']),
            'clean test images of the target class': test.images[test.labels == target]}
    return {name: float((predict(model, images, device).cpu() == target).float().mean()) for name, images in sets.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--result_file', required=True, help='an LC record: record/<result_file>/')
    parser.add_argument('--record_root', default=str(REPO_ROOT / 'record'))
    parser.add_argument('--dataset_path', default=None, help="where the record's dataset lies (default: the record's)")
    parser.add_argument('--device', default='auto')
    args = parser.parse_args(argv)
    record = load_attack_record(record_folder(args.record_root, args.result_file))
    if record['attack'] != 'lc':
        raise UserError(f"{args.result_file} is a {record['attack']} record, not an LC one")
    train, test, _ = record_splits(record, args.dataset_path)
    rates = target_rates(record, train, test, resolve_device(args.device))
    print(f"{args.result_file} (trigger amplitude {record['trigger']['amplitude']:g}): share answered as the target class")
    for name, rate in rates.items():
        print(f'  {100 * rate:6.2f}%  {name}')
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
