"""LF, low frequency (Zeng, Park, Mao and Jia, "Rethinking the Backdoor Attacks' Triggers: A Frequency
Perspective", ICCV 2021): the trigger is a smooth universal adversarial perturbation toward the target
class, computed on a clean model and kept free of high frequencies, so that frequency-based detection
finds no artefact in it. Poisoned images are ``x' = round(clip(x + v, 0, 255))`` and relabelled (all2one).

The perturbation ``v`` (float32 (C, H, W), on the 0..255 scale) is made by projected gradient descent
on the clean model's cross-entropy toward the target class over ``lf_num_images`` seeded training images:

    d = LP(grad_v sum_x CE(f(clip(x + v)), target))        the step direction, low-pass filtered
    v = fit(LP(v - lf_step_size * d / max|d|))              low-pass after every step, then the bound

``LP`` keeps the 2-D Fourier components whose radial frequency is at most ``lf_cutoff`` times the
Nyquist frequency (an ideal low-pass filter, per channel) and ``fit`` scales ``v`` down until
``max |v| <= lf_eps``. Scaling, unlike clipping, keeps ``v`` band-limited, so the final trigger has no
energy above the cut-off and lies within the L-inf bound exactly.

Defaults: 100 random training images (the authors' release); ``lf_eps = 51`` (the release scales its
pattern to 0.2 of the pixel range; BackdoorBench's CIFAR-10 PreAct-ResNet18 pattern spans 0..51);
``lf_cutoff = 0.2``, i.e. 3.2 cycles per image on 32 pixels (the release's Gaussian filter, sigma 6 px,
keeps under 1 % of the amplitude above 2.6 cycles); 50 steps (the release's 50 passes) of at most 5
pixel levels (a step size of this implementation: the release has none). pratio 0.1, all2one, target 0
(BackdoorBench's ``config/attack/lf``). Departures: the release finds the perturbation with targeted
DeepFool image by image and smooths it with that Gaussian filter; here gradient steps over the batch and
an ideal Fourier filter make the cut-off exact.

The perturbation is built once per clean model and settings (``ctx.artefact('lf_uap', ...)``) and
saved in the record (``trigger.perturbation``), so a defense rebuilds the poisoned inputs exactly."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import hashlib

import torch
import torch.nn.functional as F

from utils import UserError
from utils.attack import Attack, register_attack
from utils.config import bounded, nonnegative_int, positive_float, positive_int, run_main

CHUNK = 256  # images per forward pass


def low_pass_mask(height: int, width: int, cutoff: float) -> torch.Tensor:
    """bool (H, W) on ``torch.fft.fft2``'s frequency grid: True where the radial frequency
    ``sqrt(fy^2 + fx^2)`` (cycles per pixel) is at most ``cutoff`` times the Nyquist frequency (0.5)."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
    return (fy ** 2 + fx ** 2).sqrt() <= 0.5 * cutoff + 1e-12


def low_pass(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` (..., H, W) with every Fourier component outside ``mask`` removed (the mask is symmetric,
    so the result is real)."""
    return torch.fft.ifft2(torch.fft.fft2(x) * mask).real


def fit_bound(v: torch.Tensor, eps: float) -> torch.Tensor:
    """``v`` scaled down so that ``max |v| <= eps`` (scaling keeps its spectrum's support)."""
    peak = v.abs().max()
    return v * (eps / peak) if peak > eps else v


def low_frequency_uap(model: torch.nn.Module, images: torch.Tensor, target: int, *, eps: float, cutoff: float,
                      steps: int, step_size: float, device: torch.device) -> torch.Tensor:
    """The LF trigger: float32 (C, H, W) on the 0..255 scale, band-limited to ``cutoff`` and within
    ``eps`` (0..255 scale), pushing ``model``'s answer on uint8 ``images`` toward ``target``."""
    _, channels, height, width = images.shape
    mask = low_pass_mask(height, width, cutoff).to(device)
    v = torch.zeros(channels, height, width, device=device)
    for _ in range(steps):
        v.requires_grad_(True)
        grad = torch.zeros_like(v)
        for chunk in images.split(CHUNK):
            x = chunk.to(device).float() / 255
            logits = model((x + v / 255).clamp(0, 1))
            labels = torch.full((len(chunk),), target, dtype=torch.long, device=device)
            grad += torch.autograd.grad(F.cross_entropy(logits, labels, reduction='sum'), v)[0]
        v = v.detach()
        direction = low_pass(grad, mask)
        peak = direction.abs().max()
        if peak == 0:
            break
        v = fit_bound(low_pass(v - step_size * direction / peak, mask), eps)
    return v.cpu()


def add_perturbation(images: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) + float (C, H, W) on the 0..255 scale -> uint8: ``round(clip(x + v))``, ties to even."""
    out = [(chunk.double() + perturbation.double()).round_().clamp_(0, 255).to(torch.uint8)
           for chunk in images.split(2048)]
    return torch.cat(out) if out else images.clone()


@torch.no_grad()
def target_rate(model: torch.nn.Module, images: torch.Tensor, perturbation: torch.Tensor, target: int,
                device: torch.device) -> float:
    """Fraction of ``images`` that ``model`` classifies as ``target`` once the perturbation is added."""
    hits = 0
    for chunk in add_perturbation(images, perturbation).split(CHUNK):
        hits += int((model(chunk.to(device).float() / 255).argmax(1) == target).sum())
    return hits / max(len(images), 1)


@register_attack
class LowFrequency(Attack):
    """LF (Zeng et al., ICCV 2021): a low-frequency universal adversarial perturbation toward the target,
    made on a clean model, added to the poisoned images (all2one)."""
    name = 'lf'
    needs_clean_model = True

    def add_arguments(self, parser):
        parser.add_argument('--lf_eps', type=bounded(float, 0, 255, low_open=True), default=51.0,
                            help='L-inf bound of the perturbation on the 0..255 scale (Zeng et al. 2021; their release '
                                 'scales its pattern to 0.2 of the pixel range, i.e. 51)')
        parser.add_argument('--lf_cutoff', type=bounded(float, 0, 1, low_open=True), default=0.2,
                            help='low-pass cut-off as a fraction of the Nyquist frequency, applied after every step '
                                 '(Zeng et al. 2021: a low-pass filter keeps the trigger free of high frequencies)')
        parser.add_argument('--lf_steps', type=positive_int, default=50,
                            help='gradient steps of the universal perturbation '
                                 '(Zeng et al. 2021: 50 passes in the release)')
        parser.add_argument('--lf_step_size', type=positive_float, default=5.0,
                            help='largest pixel change of one step on the 0..255 scale (the gradient step of the '
                                 'universal perturbation of Zeng et al. 2021)')
        parser.add_argument('--lf_num_images', type=positive_int, default=100,
                            help='training images the perturbation is computed on '
                                 '(Zeng et al. 2021: 100 in the release)')
        parser.add_argument('--lf_seed', type=nonnegative_int, default=None,
                            help='seed of the choice of those images (unset: random_seed)')

    def setup(self, args, spec):
        if args.attack_label_trans != 'all2one':
            raise UserError(f'lf makes a universal perturbation toward one target class: attack_label_trans must be '
                            f'all2one, got {args.attack_label_trans}')
        self.seed = args.random_seed if args.lf_seed is None else args.lf_seed
        self.settings = {'eps': float(args.lf_eps), 'cutoff': float(args.lf_cutoff), 'steps': args.lf_steps,
                         'step_size': float(args.lf_step_size)}

    def prepare(self, ctx):
        model = ctx.clean_model()
        count = min(ctx.args.lf_num_images, len(ctx.train))
        chosen = torch.randperm(len(ctx.train), generator=torch.Generator().manual_seed(self.seed))[:count]
        images = ctx.train.images[chosen]
        target = ctx.args.attack_target
        inputs = {'clean_model': ctx.clean_model_digest(), 'target': target,
                  'images': hashlib.sha256(images.numpy().tobytes()).hexdigest()} | self.settings

        def build():
            perturbation = low_frequency_uap(model, images, target, device=ctx.device, **self.settings)
            return {'perturbation': perturbation,
                    'target_rate': target_rate(model, images, perturbation, target, ctx.device)}

        artefact = ctx.artefact('lf_uap', inputs, build)
        self.perturbation, self.target_rate = artefact['perturbation'], artefact['target_rate']
        ctx.log(f'lf: perturbation max |v| {self.perturbation.abs().max():.1f}/255, clean model answers the target '
                f'on {100 * self.target_rate:.1f}% of the {count} images it was computed on')

    def apply_trigger(self, images, *, train, index=None, generator=None):
        return add_perturbation(images, self.perturbation)

    def record_extras(self):
        return {'trigger': {'perturbation': self.perturbation, 'target_rate': self.target_rate,
                            'seed': self.seed} | self.settings}


def main(argv=None):
    return LowFrequency().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
