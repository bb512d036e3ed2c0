"""Blended (Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning",
2017): the trigger is a whole image ``t`` blended into the input with the paper's blended-injection
function ``x' = (1 - alpha) * x + alpha * t``.

Defaults: ``alpha = 0.2`` for training and test (BackdoorBench's ``attack_train_blended_alpha`` /
``attack_test_blended_alpha``). The trigger: an image file (``attack_trigger_img_path``, resized to
the input size); the CIFAR-10 YAML blends a natural photograph, as BackdoorBench does with its Hello
Kitty image, which may not be redistributed: ``config/attack/blended/chelsea_64.png``, scikit-image's
CC0 "Chelsea the cat". Without an image (the option empty), the paper's random-pattern key: a
uniform-noise image whose pixels are independent integers in 0..255, generated from ``pattern_seed``
(independent of ``random_seed``, so one trigger can serve several training seeds).

Pixels: ``x`` and ``t`` are uint8; the blend is computed in float64 in exactly that order,
``(1 - alpha) * x + alpha * t``, rounded to the nearest integer (ties to even, ``torch.round``)
and clamped to 0..255. A test can therefore reproduce every poisoned pixel exactly."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import torch

from utils.attack import Attack, register_attack
from utils.config import nonnegative_int, path_arg, probability, run_main
from utils.triggers import load_trigger_image

CHUNK = 2048  # images per float64 block (bounds the temporary memory)


def noise_pattern(input_shape, seed: int) -> torch.Tensor:
    """The random-pattern key: uint8 (C, H, W), every pixel uniform in 0..255, from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, tuple(input_shape), generator=generator, dtype=torch.uint8)


def blend(images: torch.Tensor, pattern: torch.Tensor, alpha: float) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8: ``round((1 - alpha) * x + alpha * t)`` in float64, ties to even."""
    weight = pattern.double() * alpha
    out = [((1.0 - alpha) * chunk.double() + weight).round_().clamp_(0, 255).to(torch.uint8)
           for chunk in images.split(CHUNK)]
    return torch.cat(out) if out else images.clone()


@register_attack
class Blended(Attack):
    """Blended: x' = (1 - alpha) x + alpha t, alpha 0.2, t an image file (CIFAR-10 YAML: a CC0 cat photograph) or seeded uniform noise."""
    name = 'blended'

    def add_arguments(self, parser):
        parser.add_argument('--attack_train_blended_alpha', type=probability, default=0.2,
                            help='blend weight alpha of the trigger in the poisoned training images (0..1)')
        parser.add_argument('--attack_test_blended_alpha', type=probability, default=0.2,
                            help='blend weight alpha of the trigger in the poisoned test images (0..1)')
        parser.add_argument('--attack_trigger_img_path', default=None, type=path_arg,
                            help="trigger image (resized to the input size); '' or none: a seeded uniform-noise pattern")
        parser.add_argument('--pattern_seed', type=nonnegative_int, default=0,
                            help='seed of the uniform-noise pattern (independent of random_seed)')

    def setup(self, args, spec):
        if args.attack_trigger_img_path:
            self.pattern = load_trigger_image(args.attack_trigger_img_path, spec.input_shape)
        else:
            self.pattern = noise_pattern(spec.input_shape, args.pattern_seed)
        self.train_alpha = float(args.attack_train_blended_alpha)
        self.test_alpha = float(args.attack_test_blended_alpha)

    def apply_trigger(self, images, *, train, index=None, generator=None):
        return blend(images, self.pattern, self.train_alpha if train else self.test_alpha)

    def record_extras(self):
        return {'trigger': {'pattern': self.pattern, 'train_alpha': self.train_alpha,
                            'test_alpha': self.test_alpha}}



def main(argv=None):
    return Blended().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
