"""Training throughput: this toolkit's pipeline against a BackdoorBench-style one, same model, same
batch size, same images, in one run. Prints images/s of each and the ratio.

- toolkit: :func:`utils.train.train` (uint8 tensors resident on the device, crop and flip batched
  on the device, mixed precision on CUDA unless ``--amp false``);
- BackdoorBench-style: a map-style dataset of PIL images with torchvision transforms
  (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor), a DataLoader with ``--workers``
  processes and pinned memory, a plain SGD loop (BackdoorBench's default, no AMP unless ``--amp true``).

    python bench/throughput.py --model preactresnet18 --device cuda --images 50000
    python bench/throughput.py --model resnet20 --device cpu --images 2048 --workers 0   # a quick look

Each pipeline first runs ``--warmup`` batches untimed (cuDNN autotuning, worker start-up), then one
timed pass over ``--images`` images (the dataset's training images, repeated when it has fewer).
Not a test: it can take long.
"""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.profiling import profiled
from models import build_model
from utils import REPO_ROOT
from utils.config import resolve_device, run_main, str2bool, synchronize
from utils.data import Split, dataset_spec, load_dataset
from utils.train import TrainSettings, train


def toolkit_images_per_second(model, data: Split, batch_size: int, amp: bool, device, warmup: int,
                              channels_last: bool = False, compile: str = 'none', fused: bool = False) -> float:
    settings = TrainSettings(epochs=1, batch_size=batch_size, lr=0.01, amp=amp, channels_last=channels_last, compile=compile)
    # fused: the SGD update of every parameter in one kernel launch instead of a few per parameter group
    optimizer = torch.optim.SGD(model.to(device).parameters(), lr=settings.lr, momentum=settings.sgd_momentum,
                                weight_decay=settings.wd, fused=True) if fused else None
    # compiled during the untimed warm-up; every batch has the same size (see main)
    train(model, data.subset(torch.arange(min(warmup * batch_size, len(data)))), settings, device,
          optimizer=optimizer, log=lambda _: None)
    synchronize(device)
    started = time.perf_counter()
    train(model, data, settings, device, optimizer=optimizer, log=lambda _: None)
    synchronize(device)
    return len(data) / (time.perf_counter() - started)


class PILImages(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 class serves: one PIL image per index, transformed on access."""

    def __init__(self, data: Split, transform):
        self.images = data.images.permute(0, 2, 3, 1).numpy()   # HWC uint8, as torchvision stores CIFAR
        self.labels = data.labels.numpy()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def backdoorbench_images_per_second(model, data: Split, batch_size: int, amp: bool, device, warmup: int,
                                    workers: int) -> float:
    import torchvision.transforms as T
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    loader = torch.utils.data.DataLoader(PILImages(data, transform), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, pin_memory=device.type == 'cuda', drop_last=False,
                                         persistent_workers=workers > 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == 'cuda')
    model.to(device).train()

    def one_pass(limit=None):
        seen = 0
        for step, (x, y) in enumerate(loader):
            if limit is not None and step >= limit:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss.item()              # BackdoorBench logs the batch loss every step
            seen += len(y)
        return seen

    one_pass(limit=warmup)
    synchronize(device)
    started = time.perf_counter()
    seen = one_pass()
    synchronize(device)
    return seen / (time.perf_counter() - started)


def profile_steps(model, data: Split, batch_size: int, amp: bool, device, steps: int) -> None:
    """Wall time against GPU kernel time per step of the toolkit's loop: far more wall than kernel
    time means the GPU waits on the CPU (launches, Python), which CUDA graphs remove."""
    settings = TrainSettings(epochs=1, batch_size=batch_size, lr=0.01, amp=amp)
    few = data.subset(torch.arange(steps * batch_size))
    train(model, few, settings, device, log=lambda _: None)          # warm-up
    wall, kernel, launches, table = profiled(lambda: train(model, few, settings, device, log=lambda _: None), device)
    print(f'profile, {steps} steps: {1000 * wall / steps:.2f} ms wall per step (profiler on), {1000 * kernel / steps:.2f} ms '
          f'of GPU kernels per step in {launches // steps} launches')
    print(table)


PIPELINES = {'toolkit': 'toolkit', 'backdoorbench': 'backdoorbench-style', 'channels_last': 'toolkit, channels-last',
             'cudnn_benchmark': 'toolkit, cudnn.benchmark', 'compile': 'toolkit, torch.compile',
             'cuda_graphs': 'toolkit, CUDA graphs', 'cuda_graphs_fused': 'toolkit, CUDA graphs + fused SGD'}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='preactresnet18')
    parser.add_argument('--dataset_path', default=str(REPO_ROOT / 'data'))
    parser.add_argument('--images', type=int, default=50000, help='images in the timed pass (one CIFAR-10 epoch)')
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--workers', type=int, default=4, help="the BackdoorBench-style DataLoader's processes")
    parser.add_argument('--warmup', type=int, default=10, help='untimed batches before each timed pass')
    parser.add_argument('--amp', type=str2bool, default=True, help='mixed precision in both pipelines (CUDA only)')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--variants', type=str2bool, default=None,
                        help="also time the toolkit's loop in channels-last, with cuDNN autotuning, under torch.compile, "
                             "under torch.compile's CUDA graphs (--compile reduce-overhead), and so with a fused SGD "
                             '(default: on CUDA)')
    parser.add_argument('--only', nargs='+', default=None, choices=list(PIPELINES), metavar='PIPELINE',
                        help=f'time these pipelines alone ({", ".join(PIPELINES)}); default: toolkit and backdoorbench, '
                             'then the variants when --variants is on')
    parser.add_argument('--profile', type=int, default=0, metavar='STEPS',
                        help="profile this many steps of the toolkit's loop: wall time against GPU kernel time per step")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    variants = device.type == 'cuda' if args.variants is None else args.variants
    train_split, _ = load_dataset('cifar10', args.dataset_path)
    images = max(args.batch_size, args.images // args.batch_size * args.batch_size)   # whole batches only
    repeat = torch.arange(images) % len(train_split)
    data = train_split.subset(repeat[torch.randperm(len(repeat), generator=torch.Generator().manual_seed(0))])
    spec = dataset_spec('cifar10')
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'{args.model}, batch {args.batch_size}, {images} images, AMP {args.amp and device.type == "cuda"}, on {name}')

    def fresh_model():
        torch.manual_seed(0)
        return build_model(args.model, spec.num_classes, spec.input_shape, dataset='cifar10').to(device)

    def toolkit(**options):
        return lambda m: toolkit_images_per_second(m, data, args.batch_size, args.amp, device, args.warmup, **options)

    measures = {'toolkit': toolkit(),
                'backdoorbench': lambda m: backdoorbench_images_per_second(
                    m, data, args.batch_size, args.amp, device, args.warmup, args.workers),
                'channels_last': toolkit(channels_last=True),
                'cudnn_benchmark': toolkit(),
                'compile': toolkit(compile='default'),
                'cuda_graphs': toolkit(compile='reduce-overhead'),
                'cuda_graphs_fused': toolkit(compile='reduce-overhead', fused=True)}
    # slowest to set up last: a time limit then cuts only the extras
    chosen = args.only or (list(PIPELINES) if variants else ['toolkit', 'backdoorbench'])
    rates = {}
    for label, measure in ((PIPELINES[key], measures[key]) for key in PIPELINES if key in chosen):
        torch.backends.cudnn.benchmark = label.endswith('cudnn.benchmark')
        model = fresh_model()
        started = time.perf_counter()
        rates[label] = measure(model)
        print(f'{label:>25}: {rates[label]:10.0f} images/s ({time.perf_counter() - started:.0f} s with warm-up)', flush=True)
        if label == 'backdoorbench-style' and 'toolkit' in rates:
            print(f'ratio (toolkit / backdoorbench-style): {rates["toolkit"] / rates["backdoorbench-style"]:.2f}x', flush=True)
    torch.backends.cudnn.benchmark = False
    if 'backdoorbench-style' in rates:
        for label, rate in rates.items():
            print(f'{label:>32} / backdoorbench-style: {rate / rates["backdoorbench-style"]:.2f}x')
    if args.profile:
        profile_steps(fresh_model(), data, args.batch_size, args.amp, device, args.profile)
    return 0 if np.isfinite(list(rates.values())).all() else 1


if __name__ == '__main__':
    sys.exit(run_main(main))
