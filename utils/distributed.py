"""Data-parallel training across processes started by ``torchrun --nproc_per_node=N`` (one per GPU,
or gloo processes on a CPU): every process holds the whole dataset and draws the same shuffling and
augmentation, takes its share of each batch, and DistributedDataParallel averages the gradients, so
N processes train as one process would on the full batch (up to BatchNorm, whose statistics stay per
process). Only rank 0 writes: records, checkpoints, logs. Without torchrun everything here is a no-op."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get('WORLD_SIZE', '1'))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get('RANK', '0'))


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (nccl on CUDA, gloo on the CPU); the device of this
    process (``cuda:LOCAL_RANK`` on CUDA)."""
    if world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return device


def active() -> bool:
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def shard(x: torch.Tensor) -> torch.Tensor:
    """This process's share of a batch (every ``world``-th sample from its rank)."""
    return x[rank()::world_size()] if active() else x


def summed(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the processes."""
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def from_main(value: Optional[bool]) -> bool:
    """Rank 0's value of a flag, on every process (decisions made from rank 0's evaluation)."""
    if not active():
        return bool(value)
    tensor = torch.tensor([int(bool(value))])
    dist.broadcast(tensor, 0)
    return bool(tensor.item())


def barrier() -> None:
    if active():
        dist.barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model to run training steps through: DistributedDataParallel when distributed."""
    if not active():
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)


def teardown() -> None:
    if active():
        dist.destroy_process_group()
