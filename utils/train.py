"""The one training loop, used by attacks (training the backdoored model) and defenses
(fine-tuning, mask learning, unlearning). As in torchvision's reference ``train_one_epoch``, the
caller may own the optimizer and the loss: :func:`train` takes an optimizer (or parameter groups
for the recipe's SGD), a ``loss_fn(model, x, y)`` and a ``phase`` name that names the checkpoint
and the metrics file, so a defense with several phases resumes the right one. AMP runs on CUDA
only (bf16 where supported, else fp16 with a gradient scaler); augmentation is batched on the
training device; every epoch is evaluated into the metrics file and checkpointed. On CUDA the loop reads
the loss back once per epoch, not per step, so the CPU queues work ahead of the GPU; ``channels_last``
trains in the NHWC layout.

Randomness (shuffling, augmentation, per-batch poisoning) comes from a generator seeded with
(seed, epoch), so a run resumed from epoch k's checkpoint is identical to an uninterrupted one."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from . import UserError, distributed
from .config import (COMPILE_MODES, ToolkitParser, nonnegative_float, nonnegative_int, positive_float, positive_int,
                     str2bool)
from .data import Split, augment, to_float
from .record import load_torch, save_csv, save_torch

CHECKPOINT = 'checkpoint.pt'
METRICS = 'metrics.csv'
SCHEDULERS = ('CosineAnnealingLR', 'MultiStepLR', 'none')

# (images, labels, generator, model) -> (images, labels): per-batch poisoning (WaNet, Input-aware)
BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Generator, nn.Module], tuple[torch.Tensor, torch.Tensor]]
# (model, images, labels) -> loss, or (loss, logits) when training accuracy should be logged
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The default loss: cross-entropy of the model's logits."""
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def phase_files(phase: Optional[str]) -> tuple[str, str]:
    """(checkpoint, metrics) file names of a training phase; the unnamed phase keeps the plain names."""
    if phase is None:
        return CHECKPOINT, METRICS
    if not phase.replace('_', '').isalnum():
        raise ValueError(f'phase names are letters, digits and underscores, got {phase!r}')
    return f'checkpoint_{phase}.pt', f'metrics_{phase}.csv'


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
    compile: str = 'none'          # torch.compile mode of the training step (utils.config.COMPILE_MODES)
    channels_last: bool = False    # CUDA only: NHWC activations and weights (slower for PreAct-ResNet18 on an H200: bench/throughput.py)

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
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f'lr must be a finite number > 0, got {self.lr}')
        if self.compile not in COMPILE_MODES:
            raise UserError(f'compile must be one of {", ".join(COMPILE_MODES)}, got {self.compile!r}')


def add_training_arguments(parser: ToolkitParser) -> None:
    """The training-recipe options (names as in BackdoorBench's YAML files)."""
    group = parser.add_argument_group('training')
    group.add_argument('--epochs', type=nonnegative_int, default=100)
    group.add_argument('--batch_size', type=positive_int, default=128)
    group.add_argument('--lr', type=positive_float, default=0.01, help='initial SGD learning rate')
    group.add_argument('--sgd_momentum', type=nonnegative_float, default=0.9)
    group.add_argument('--wd', type=nonnegative_float, default=5e-4, help='weight decay')
    group.add_argument('--lr_scheduler', default='CosineAnnealingLR', choices=SCHEDULERS)
    group.add_argument('--min_lr', type=nonnegative_float, default=0.0, help='final learning rate of the cosine schedule')
    group.add_argument('--steplr_milestones', type=positive_int, nargs='*', default=[],
                       help='epochs at which MultiStepLR divides lr by 10')
    group.add_argument('--augment', type=str2bool, default=True, help='random crop (padding 4) and, where the dataset allows, horizontal flip')


def make_optimizer(params: Iterable, settings: TrainSettings) -> torch.optim.Optimizer:
    """The recipe's optimizer: SGD with momentum and weight decay over ``params`` (tensors or groups)."""
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.sgd_momentum, weight_decay=settings.wd)


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped, scheduled and checkpointed as one (the classifier's SGD beside a
    generator's Adam), so the one training loop serves joint training. The loop's learning-rate
    schedule scales every group of every part."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        # no super().__init__: it would copy the groups, and the parts' own groups must be the ones scheduled
        self.optimizers = optimizers
        self.defaults = {}
        self.state = {}

    @property
    def param_groups(self):
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self, closure=None):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {'optimizers': [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict):
        for optimizer, state in zip(self.optimizers, state_dict['optimizers'], strict=True):
            optimizer.load_state_dict(state)


def _scheduler(optimizer, settings: TrainSettings):
    if settings.lr_scheduler == 'CosineAnnealingLR':
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, settings.epochs), eta_min=settings.min_lr)
    if settings.lr_scheduler == 'MultiStepLR':
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(settings.steplr_milestones), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def amp_dtype(device: torch.device, enabled: bool) -> Optional[torch.dtype]:
    """The autocast dtype: bf16 where the GPU supports it, else fp16; None off CUDA or when disabled."""
    if not (enabled and device.type == 'cuda'):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def estimated_seconds(model: nn.Module, data: Split, settings: TrainSettings, device: torch.device, batches: int = 2) -> float:
    """Seconds the recipe's training would take, from a timed forward and backward of ``batches``
    batches on a copy of ``model`` (its weights, the global random state and the data are left alone)."""
    import copy
    twin = copy.deepcopy(model).to(device).train()
    size = min(settings.batch_size, len(data))
    x = to_float(data.images[:size]).to(device)
    y = data.labels[:size].to(device)
    F.cross_entropy(twin(x), y).backward()              # warm-up, not timed
    started = time.perf_counter()
    for _ in range(batches):
        F.cross_entropy(twin(x), y).backward()
    per_batch = (time.perf_counter() - started) / batches
    return per_batch * math.ceil(len(data) / settings.batch_size) * settings.epochs


def train(model: nn.Module, data: Split, settings: TrainSettings, device: torch.device, *,
          optimizer: Union[torch.optim.Optimizer, Iterable, None] = None, loss_fn: Optional[LossFn] = None,
          phase: Optional[str] = None, state_modules: Optional[dict[str, nn.Module]] = None,
          evaluate_fn: Optional[Callable[[nn.Module], dict]] = None, workdir: Optional[Path] = None,
          resume: bool = False, hflip: bool = True, batch_hook: Optional[BatchHook] = None,
          after_step: Optional[Callable[[nn.Module], None]] = None, train_mode: bool = True,
          stop_when: Optional[Callable[[dict], bool]] = None, log: Callable[[str], None] = print,
          desc: Optional[str] = None) -> list[dict]:
    """Train ``model`` in place on ``data`` and return one metrics row per epoch.

    ``optimizer``: an optimizer the caller built, or parameters / parameter groups for the
    recipe's SGD (default: all of ``model``'s parameters). ``loss_fn(model, x, y)``: the loss,
    or (loss, logits) to log training accuracy (default: cross-entropy). ``state_modules``: other
    modules trained beside ``model`` (a trigger generator, masks), saved in and restored from the
    checkpoint. ``train_mode=False`` keeps ``model`` in eval mode (BatchNorm statistics frozen),
    as mask and trigger optimisation want. With ``workdir``, every epoch rewrites the phase's
    metrics file and checkpoint there (:func:`phase_files`); with ``resume`` training continues
    after the checkpoint's epoch, and a finished phase loads its final state and trains no more.
    Under ``torchrun`` (see :mod:`utils.distributed`) each process trains on its share of every batch
    through DistributedDataParallel (``loss_fn`` then receives the wrapped model), the epoch's loss and
    accuracy are summed over the processes, and only rank 0 evaluates and writes.
    ``batch_hook`` poisons each batch after augmentation; ``after_step`` runs after every
    optimiser step (FMP's mask mode keeps pruned channels at zero with it); ``stop_when(row)`` ends
    the phase early after an epoch whose metrics row satisfies it (RNP's unlearning stops once
    clean accuracy has fallen far enough); a resumed run remembers that it stopped."""
    model.to(device)
    state_modules = dict(state_modules or {})
    for module in state_modules.values():
        module.to(device)
    if optimizer is None:
        optimizer = make_optimizer(model.parameters(), settings)
    elif not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = make_optimizer(optimizer, settings)
    loss_fn = loss_fn or cross_entropy_loss
    desc = desc or phase or 'train'
    scheduler = _scheduler(optimizer, settings)
    dtype = amp_dtype(device, settings.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    rows: list[dict] = []
    start_epoch = 0
    checkpoint_name, metrics_name = phase_files(phase)
    checkpoint_path = Path(workdir) / checkpoint_name if workdir else None
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        state = load_torch(checkpoint_path, 'checkpoint')
        model.load_state_dict(state['model'])
        for name, module in state_modules.items():
            module.load_state_dict(state['modules'][name])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if 'scaler' in state:
            scaler.load_state_dict(state['scaler'])
        rows, start_epoch = list(state['rows']), int(state['epoch']) + 1
        if state.get('stopped'):
            start_epoch = settings.epochs
        log(f'resumed {desc} from {checkpoint_path} after epoch {len(rows)}')

    images = data.images.to(device)
    labels = data.labels.to(device)
    layout = torch.channels_last if settings.channels_last and device.type == 'cuda' else None
    if layout is not None:
        model.to(memory_format=layout)
    step_model = distributed.wrap(model, device)    # DistributedDataParallel under torchrun, else the model
    graphs = settings.compile == 'reduce-overhead' and device.type == 'cuda'
    if settings.compile != 'none':
        # the same parameters: the checkpoint and the record save ``model``; evaluation runs it uncompiled.
        # dynamic=False: a last, smaller batch compiles once more rather than making every shape symbolic
        step_model = torch.compile(step_model, mode=settings.compile if graphs else 'default', dynamic=False)
    if not distributed.is_main():
        checkpoint_path = None                     # only rank 0 writes
    for epoch in range(start_epoch, settings.epochs):
        started = time.time()
        generator = epoch_generator(settings.seed, epoch)
        order = torch.randperm(len(labels), generator=generator).to(device)
        model.train(train_mode)
        # running sums stay on the device: reading them every step would make the CPU wait for the GPU
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        correct_total = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        batches = range(0, len(order), settings.batch_size)
        bar = tqdm(batches, desc=f'{desc} {epoch + 1}/{settings.epochs}', leave=False, disable=None)
        for step, start in enumerate(bar):
            index = order[start:start + settings.batch_size]
            x, y = to_float(images[index]), labels[index]
            if settings.augment:
                x = augment(x, generator, hflip)
            if batch_hook is not None:
                x, y = batch_hook(x, y, generator, model)
            x, y = distributed.shard(x), distributed.shard(y)     # every process drew the same whole batch
            if layout is not None:
                x = x.contiguous(memory_format=layout)
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()    # the previous step's graph outputs may be reused
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = loss_fn(step_model, x, y)
            loss, logits = out if isinstance(out, tuple) else (out, None)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if after_step is not None:
                after_step(model)
            loss_total += loss.detach().double() * len(y)
            if logits is not None:
                correct_total += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if not bar.disable and step % 20 == 0:
                bar.set_postfix(loss=f'{loss_total.item() / seen:.3f}')
        loss_sum, correct, seen = distributed.summed([loss_total.item(), correct_total.item(), seen], device)
        if not math.isfinite(loss_sum):
            raise UserError(f'training diverged at epoch {epoch + 1} (loss is not finite): lower lr')
        row = {'epoch': epoch + 1, 'lr': optimizer.param_groups[0]['lr'], 'train_loss': loss_sum / max(seen, 1)}
        if logits is not None:
            row['train_acc'] = correct / max(seen, 1)
        scheduler.step()
        if evaluate_fn is not None and distributed.is_main():
            row.update(evaluate_fn(model))
        row['seconds'] = round(time.time() - started, 2)
        rows.append(row)
        log(f'{desc} epoch {epoch + 1}/{settings.epochs}: ' +
            ' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items() if k != 'epoch'))
        stopped = distributed.from_main(stop_when is not None and distributed.is_main() and bool(stop_when(row)))
        if checkpoint_path is not None:
            save_torch({'epoch': epoch, 'phase': phase, 'model': model.state_dict(),
                        'modules': {name: m.state_dict() for name, m in state_modules.items()},
                        'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                        'scaler': scaler.state_dict(), 'rows': rows, 'stopped': stopped}, checkpoint_path)
            save_csv(rows, Path(workdir) / metrics_name)
        if stopped:
            log(f'{desc}: stopping after epoch {epoch + 1} (stop condition met)')
            break
    if layout is not None:
        model.to(memory_format=torch.contiguous_format)    # callers and records see the usual layout
    return rows
