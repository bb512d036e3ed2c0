"""WaNet (Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021): the
trigger is a small, smooth, fixed warping field applied with ``grid_sample``.

Warping field (paper Sec. 3.2, released code):
  1. ``P``: a k x k x 2 grid of control displacements, uniform in [-1, 1], normalised by its mean
     absolute value (so the mean |P| is 1);
  2. upsampled bicubically (``align_corners=True``) to the H x W image: ``noise``;
  3. ``grid = clamp((identity + s * noise / H) * grid_rescale, -1, 1)``, where ``identity`` is the
     grid of normalised pixel centres in [-1, 1];
  4. ``x' = grid_sample(x, grid, bilinear, align_corners=True)``.
Paper defaults for CIFAR-10: ``k = 4``, ``s = 0.5``, ``grid_rescale = 1``.

Training (paper Sec. 3.3, "noise mode"): each batch is poisoned on the fly. ``num_bd = int(pratio * B)``
samples are warped with ``grid`` and relabelled (rho_a = pratio), and ``num_cross = int(num_bd *
cross_ratio)`` further samples (rho_n = cross_ratio * rho_a; paper: rho_a = 0.1, rho_n = 0.2) are
warped with ``clamp(grid + u / H, -1, 1)``, ``u`` uniform in [-1, 1] drawn per sample and per pixel,
and keep their labels, so the model learns the exact field rather than any warp. The counts follow the
released code (``num_cross`` from the integer ``num_bd``). When ``pratio * B < 1`` a batch gets one
poisoned sample with probability ``pratio * B`` (BackdoorBench's extension to low ratios). All the
randomness comes from the training loop's per-epoch CPU generator, so training is reproducible and
resumable. The warp runs after the batched crop/flip augmentation here (the release warps first, then
crops, rotates and flips).

Record: the fixed field (``trigger.grid``, plus ``noise_grid`` and ``identity_grid``) so a defense
rebuilds exactly the same poisoned inputs; ``bd_test`` is ``warp(x)`` rounded to uint8 (nearest,
ties to even). No sample is poisoned once and for all (the poisoned and noise samples are drawn anew
in every batch), so ``bd_train`` holds a seeded realisation of what one epoch poisons: ``pratio`` of
the training set, chosen as the other attacks choose theirs, warped and relabelled (the noise-mode
samples keep their labels and are not listed). Defenses that read the poisoned training set
(spectral signatures, activation clustering, ABL) use it."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702


import torch
import torch.nn.functional as F

from utils import UserError
from utils.attack import Attack, register_attack
from utils.config import nonnegative_float, nonnegative_int, positive_float, positive_int, run_main
from utils.poison import backdoor_labels, poisoned_count

CHUNK = 1024  # images per grid_sample call when warping a whole split


def identity_grid(height: int, width: int) -> torch.Tensor:
    """float32 (1, H, W, 2): normalised (x, y) coordinates of every pixel, in [-1, 1] (align_corners=True)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing='ij')
    return torch.stack((xs, ys), dim=-1)[None]


def noise_grid(k: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """float32 (1, H, W, 2): k x k control displacements, uniform in [-1, 1] and divided by their
    mean absolute value, upsampled bicubically to H x W."""
    control = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    control = control / control.abs().mean()
    return F.interpolate(control, size=(height, width), mode='bicubic', align_corners=True).permute(0, 2, 3, 1)


def warp_grid(identity: torch.Tensor, noise: torch.Tensor, s: float, grid_rescale: float) -> torch.Tensor:
    """``clamp((identity + s * noise / H) * grid_rescale, -1, 1)``."""
    height = identity.shape[1]
    return ((identity + s * noise / height) * grid_rescale).clamp(-1, 1)


def warp(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) warped by ``grid`` (1, H, W, 2) -> uint8: bilinear ``grid_sample``
    (align_corners=True, zero padding) in float32 on [0, 1], then ``round(255 * x')``, ties to even."""
    out = []
    for chunk in images.split(CHUNK):
        x = chunk.float().div_(255)
        y = F.grid_sample(x, grid.expand(len(chunk), -1, -1, -1), mode='bilinear', padding_mode='zeros',
                          align_corners=True)
        out.append(y.mul_(255).round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.clone()


@register_attack
class WaNet(Attack):
    """WaNet: a fixed smooth warp (k=4, s=0.5), poisoned per batch with noise-mode samples (cross_ratio 2)."""
    name = 'wanet'
    per_batch = True

    def add_arguments(self, parser):
        parser.add_argument('--k', type=positive_int, default=4, help='side of the control grid of the warping field')
        parser.add_argument('--s', type=nonnegative_float, default=0.5, help='strength of the warping field')
        parser.add_argument('--grid_rescale', type=positive_float, default=1.0,
                            help='scale of the warped grid (1: none), before clamping to [-1, 1]')
        parser.add_argument('--cross_ratio', type=nonnegative_float, default=2.0,
                            help='noise-mode samples per poisoned sample (rho_n = cross_ratio * pratio)')
        parser.add_argument('--grid_seed', type=nonnegative_int, default=None,
                            help='seed of the warping field (default: random_seed)')

    def setup(self, args, spec):
        _, height, width = spec.input_shape
        if not 2 <= args.k <= min(height, width):
            raise UserError(f'k must lie in 2..{min(height, width)} (the image is {height}x{width}), got {args.k}')
        if args.pratio * (1 + args.cross_ratio) > 1:
            raise UserError(f'pratio * (1 + cross_ratio) must be <= 1 (poisoned plus noise samples per batch), '
                            f'got {args.pratio} * (1 + {args.cross_ratio})')
        seed = args.random_seed if args.grid_seed is None else args.grid_seed
        generator = torch.Generator().manual_seed(seed)
        self.k, self.s, self.grid_rescale, self.cross_ratio, self.grid_seed = (
            args.k, float(args.s), float(args.grid_rescale), float(args.cross_ratio), seed)
        self.identity_grid = identity_grid(height, width)
        self.noise_grid = noise_grid(args.k, height, width, generator)
        self.grid = warp_grid(self.identity_grid, self.noise_grid, self.s, self.grid_rescale)
        self.pratio, self.target, self.label_trans = float(args.pratio), args.attack_target, args.attack_label_trans
        self.num_classes = spec.num_classes
        self._device_grids: dict[torch.device, torch.Tensor] = {}

    def apply_trigger(self, images, *, train, index=None, generator=None):
        return warp(images, self.grid)

    def describe_training_poison(self, bd_train, args):
        expected = args.pratio * args.batch_size
        if expected < 1:
            return (f'per batch of {args.batch_size}: one poisoned sample with probability {expected:g} (the record '
                    f'lists a seeded realisation of {len(bd_train)} poisoned samples)')
        bd, cross = self.plan(args.batch_size, torch.Generator().manual_seed(0))  # counts fixed when expected >= 1
        num_bd, num_cross = len(bd), len(cross)
        return (f'per full batch of {args.batch_size}: {num_bd} poisoned and {num_cross} noise-mode samples, '
                f'drawn anew (pratio {args.pratio:g}, cross_ratio {args.cross_ratio:g}; the record lists a seeded '
                f'realisation of {len(bd_train)} poisoned samples)')

    def plan(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (CPU int64) of the poisoned and of the noise-mode samples in a batch of ``batch``."""
        num_bd = poisoned_count(self.pratio, batch, generator)
        num_cross = min(int(num_bd * self.cross_ratio), batch - num_bd)
        if num_bd + num_cross == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return empty, empty
        order = torch.randperm(batch, generator=generator)
        return order[:num_bd], order[num_bd:num_bd + num_cross]

    def poison_batch(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, model=None):
        """float (B, C, H, W) in [0, 1] and labels -> the batch with its poisoned and noise-mode samples."""
        bd, cross = self.plan(len(labels), generator)
        if len(bd) + len(cross) == 0:
            return images, labels
        height, width = images.shape[-2:]
        noise = torch.rand(len(cross), height, width, 2, generator=generator) * 2 - 1
        device = images.device
        grid = self._device_grids.get(device)
        if grid is None:
            grid = self._device_grids[device] = self.grid.to(device)
        images, labels = images.clone(), labels.clone()
        if len(bd):
            bd = bd.to(device)
            images[bd] = F.grid_sample(images[bd], grid.expand(len(bd), -1, -1, -1), align_corners=True)
            labels[bd] = backdoor_labels(labels[bd], self.target, self.label_trans, self.num_classes)
        if len(cross):
            cross = cross.to(device)
            cross_grid = (grid + noise.to(device) / height).clamp(-1, 1)
            images[cross] = F.grid_sample(images[cross], cross_grid, align_corners=True)
        return images, labels

    def batch_hook(self, args, spec):
        return self.poison_batch if args.pratio > 0 else None

    def record_extras(self):
        return {'trigger': {'grid': self.grid, 'noise_grid': self.noise_grid, 'identity_grid': self.identity_grid,
                            'k': self.k, 's': self.s, 'grid_rescale': self.grid_rescale,
                            'cross_ratio': self.cross_ratio, 'grid_seed': self.grid_seed, 'per_batch': True}}



def main(argv=None):
    return WaNet().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
