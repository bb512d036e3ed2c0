"""SIG (Barni, Kallas and Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without
Label Poisoning", ICIP 2019): a clean-label attack. A fraction of the *target-class* training images
gets a horizontal sinusoidal signal superimposed and keeps its (correct) label; at test time the same
signal on an image of another class makes the model answer the target class.

The signal (the paper's sinusoidal backdoor signal) is, for an image of width ``m``,

    v(i, j) = delta * sin(2 * pi * j * f / m)      (the same for every row i and every channel)

added to the image and clipped to [0, 255]: ``x' = clip(x + v, 0, 255)``. Defaults ``delta = 40``
(on the 0..255 scale) and ``f = 6``, BackdoorBench's ``sig_delta`` / ``sig_f``.

Pixels: computed in float64, rounded to the nearest integer (ties to even, ``torch.round``) and
clamped to 0..255. (BackdoorBench truncates instead; rounding keeps the signal unbiased.)

``pratio`` here is the fraction of the target class that is poisoned (the base class's clean-label
convention), not of the whole training set as in BackdoorBench."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import math

import torch

from utils import UserError
from utils.attack import Attack, register_attack
from utils.config import bounded, positive_float, run_main

CHUNK = 2048  # images per float64 block (bounds the temporary memory)


def sinusoid(height: int, width: int, delta: float, f: float) -> torch.Tensor:
    """float64 (H, W): ``delta * sin(2 * pi * j * f / W)`` at column j, constant down each column."""
    j = torch.arange(width, dtype=torch.float64)
    row = delta * torch.sin(2 * math.pi * j * f / width)
    return row.expand(height, width).clone()


def add_signal(images: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) + float64 (H, W) -> uint8: ``round(clip(x + v, 0, 255))``, ties to even."""
    out = [(chunk.double() + signal).round_().clamp_(0, 255).to(torch.uint8) for chunk in images.split(CHUNK)]
    return torch.cat(out) if out else images.clone()


@register_attack
class SIG(Attack):
    """SIG: clean-label, x' = clip(x + delta sin(2 pi j f / W)) on pratio of the target class (labels kept)."""
    name = 'sig'
    clean_label = True

    def add_arguments(self, parser):
        parser.add_argument('--sig_delta', type=bounded(float, 0, 255, low_open=True), default=40.0,
                            help='amplitude delta of the sinusoid, on the 0..255 pixel scale')
        parser.add_argument('--sig_f', type=positive_float, default=6.0,
                            help='frequency f of the sinusoid: periods across the image width')

    def setup(self, args, spec):
        if args.attack_label_trans != 'all2one':
            raise UserError(f'sig is a clean-label attack on one target class: attack_label_trans must be all2one, '
                            f'got {args.attack_label_trans}')
        _, height, width = spec.input_shape
        self.delta, self.f = float(args.sig_delta), float(args.sig_f)
        self.signal = sinusoid(height, width, self.delta, self.f)

    def apply_trigger(self, images, *, train, index=None, generator=None):
        return add_signal(images, self.signal)

    def record_extras(self):
        return {'trigger': {'signal': self.signal, 'delta': self.delta, 'f': self.f}}



def main(argv=None):
    return SIG().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
