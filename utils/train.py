"""The one training loop, used by attacks (training the backdoored model) and defenses
(fine-tuning). SGD with a per-epoch schedule, AMP on CUDA only, batched augmentation on the
training device, per-epoch evaluation into metrics.csv, a checkpoint each epoch and resume.

Randomness (shuffling, augmentation, per-batch poisoning) comes from a generator seeded with
(seed, epoch), so a run resumed from epoch k's checkpoint is identical to an uninterrupted one."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import UserError
from .config import ToolkitParser, str2bool
from .data import Split, augment, to_float
from .record import load_torch, save_csv, save_torch

CHECKPOINT = 'checkpoint.pt'
SCHEDULERS = ('CosineAnnealingLR', 'MultiStepLR', 'none')

# (images, labels, generator) -> (images, labels): per-batch poisoning such as WaNet's
BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    sgd_momentum: float = 0.9
    wd: float = 5e-4
    lr_scheduler: str = 'CosineAnnealingLR'
    min_lr: float = 0.0
    steplr_milestones: tuple[int, ...] = ()
    amp: bool = True
    seed: int = 0
    augment: bool = True

    @classmethod
    def from_args(cls, args) -> 'TrainSettings':
        fields = cls.__dataclass_fields__
        values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
        values['seed'] = args.random_seed
        if 'steplr_milestones' in values:
            values['steplr_milestones'] = tuple(values['steplr_milestones'] or ())
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.epochs < 0:
            raise UserError(f'epochs must be >= 0, got {self.epochs}')
        if self.batch_size < 1:
            raise UserError(f'batch_size must be >= 1, got {self.batch_size}')
        if not self.lr > 0:
            raise UserError(f'lr must be > 0, got {self.lr}')


def add_training_arguments(parser: ToolkitParser) -> None:
    """The training-recipe options (names as in BackdoorBench's YAML files)."""
    group = parser.add_argument_group('training')
    group.add_argument('--epochs', type=int, default=100)
    group.add_argument('--batch_size', type=int, default=128)
    group.add_argument('--lr', type=float, default=0.01, help='initial SGD learning rate')
    group.add_argument('--sgd_momentum', type=float, default=0.9)
    group.add_argument('--wd', type=float, default=5e-4, help='weight decay')
    group.add_argument('--lr_scheduler', default='CosineAnnealingLR', choices=SCHEDULERS)
    group.add_argument('--min_lr', type=float, default=0.0, help='final learning rate of the cosine schedule')
    group.add_argument('--steplr_milestones', type=int, nargs='*', default=[], help='epochs at which MultiStepLR divides lr by 10')
    group.add_argument('--augment', type=str2bool, default=True, help='random crop (padding 4) and, where the dataset allows, horizontal flip')


def _scheduler(optimizer, settings: TrainSettings):
    if settings.lr_scheduler == 'CosineAnnealingLR':
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, settings.epochs), eta_min=settings.min_lr)
    if settings.lr_scheduler == 'MultiStepLR':
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(settings.steplr_milestones), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == 'cuda':
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast('cuda', dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def train(model: nn.Module, data: Split, settings: TrainSettings, device: torch.device, *,
          evaluate_fn: Optional[Callable[[nn.Module], dict]] = None, workdir: Optional[Path] = None,
          resume: bool = False, hflip: bool = True, batch_hook: Optional[BatchHook] = None,
          after_step: Optional[Callable[[nn.Module], None]] = None, log: Callable[[str], None] = print,
          desc: str = 'train') -> list[dict]:
    """Train ``model`` in place on ``data`` and return one metrics row per epoch.

    With ``workdir``, every epoch rewrites ``metrics.csv`` and ``checkpoint.pt`` there; with
    ``resume`` training continues after the checkpoint's epoch. ``after_step`` runs after every
    optimiser step (FMP's mask mode keeps pruned channels at zero with it)."""
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.sgd_momentum,
                                weight_decay=settings.wd)
    scheduler = _scheduler(optimizer, settings)
    rows: list[dict] = []
    start_epoch = 0
    checkpoint_path = Path(workdir) / CHECKPOINT if workdir else None
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        state = load_torch(checkpoint_path, 'checkpoint')
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        rows, start_epoch = list(state['rows']), int(state['epoch']) + 1
        log(f'resumed from {checkpoint_path} after epoch {start_epoch}')

    images = data.images.to(device)
    labels = data.labels.to(device)
    for epoch in range(start_epoch, settings.epochs):
        started = time.time()
        generator = epoch_generator(settings.seed, epoch)
        order = torch.randperm(len(labels), generator=generator).to(device)
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        batches = range(0, len(order), settings.batch_size)
        bar = tqdm(batches, desc=f'{desc} {epoch + 1}/{settings.epochs}', leave=False, disable=None)
        for start in bar:
            index = order[start:start + settings.batch_size]
            x, y = to_float(images[index]), labels[index]
            if settings.augment:
                x = augment(x, generator, hflip)
            if batch_hook is not None:
                x, y = batch_hook(x, y, generator)
            with _autocast(device, settings.amp):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(model)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f'{loss_sum / seen:.3f}', acc=f'{correct / seen:.3f}')
        if not math.isfinite(loss_sum):
            raise UserError(f'training diverged at epoch {epoch + 1} (loss is not finite): lower lr')
        row = {'epoch': epoch + 1, 'lr': optimizer.param_groups[0]['lr'],
               'train_loss': loss_sum / max(seen, 1), 'train_acc': correct / max(seen, 1)}
        scheduler.step()
        if evaluate_fn is not None:
            row.update(evaluate_fn(model))
        row['seconds'] = round(time.time() - started, 2)
        rows.append(row)
        log(f'{desc} epoch {epoch + 1}/{settings.epochs}: ' +
            ' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items() if k != 'epoch'))
        if checkpoint_path is not None:
            save_torch({'epoch': epoch, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                        'scheduler': scheduler.state_dict(), 'rows': rows}, checkpoint_path)
            save_csv(rows, Path(workdir) / 'metrics.csv')
    return rows
