"""Data-parallel training under torchrun: two gloo processes on the CPU train the record a single
process trains with the same seed. The MLP has no BatchNorm, so the only difference is the order of
floating-point sums: weights within 1e-4, ACC/ASR/RA within 0.01 (one test image in 100 may flip)."""
import sys

import torch

from conftest import CIFAR10_DIR, REPO_ROOT, describe, run_script

ARGS = ['./attack/badnet_attack.py', '--yaml_path', '../config/attack/badnet/cifar10.yaml', '--dataset_path', str(CIFAR10_DIR),
        '--model', 'mlp', '--epochs', '2', '--train_fraction', '0.02', '--test_fraction', '0.02', '--batch_size', '64',
        '--device', 'cpu', '--lr', '0.05']


def test_two_gloo_processes_train_what_one_process_trains(tmp_path):
    single = run_script([*ARGS, '--record_root', tmp_path / 'single', '--save_folder_name', 'rec'], timeout=600)
    assert single.returncode == 0, describe(single)
    double = run_script(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *ARGS,
                         '--record_root', tmp_path / 'double', '--save_folder_name', 'rec'], timeout=600)
    assert double.returncode == 0, describe(double)
    one = torch.load(tmp_path / 'single' / 'rec' / 'attack_result.pt', weights_only=True)
    two = torch.load(tmp_path / 'double' / 'rec' / 'attack_result.pt', weights_only=True)
    for name, value in one['model'].items():
        assert torch.allclose(value, two['model'][name], atol=1e-4), name
    for metric in ('acc', 'asr', 'ra'):
        assert abs(one['metrics'][metric] - two['metrics'][metric]) <= 0.01, (metric, one['metrics'], two['metrics'])
    # rank 0 alone wrote: one log, one run, the metrics of both processes' samples
    log = (tmp_path / 'double' / 'rec' / 'log.txt').read_text()
    assert log.count('badnet on cifar10') == 1
    rows_one = (tmp_path / 'single' / 'rec' / 'metrics.csv').read_text().splitlines()
    rows_two = (tmp_path / 'double' / 'rec' / 'metrics.csv').read_text().splitlines()
    assert len(rows_one) == len(rows_two) == 3
    loss = lambda rows: float(rows[-1].split(',')[rows[0].split(',').index('train_loss')])  # noqa: E731
    assert abs(loss(rows_one) - loss(rows_two)) < 1e-3
