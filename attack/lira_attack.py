"""LIRA (Doan et al., "LIRA: Learnable, Imperceptible and Robust Backdoor Attacks", ICCV 2021): a
generator T learns an imperceptible, input-specific additive trigger ``x' = clamp(x + eps * T(x), 0, 1)``
(T ends in tanh, so ``|x' - x| <= eps`` per pixel: an L-inf bound) together with the classifier.

Training (the paper's objective, BackdoorBench's defaults for CIFAR-10):
  1. Joint phase (phase ``joint``, ``joint_epochs`` 50): per batch, the classifier minimises
     ``alpha * CE(f(x), y) + (1 - alpha) * CE(f(x'), target)`` (alpha 0.5) and T minimises the attack
     loss ``CE(f(x'), target)`` (Adam, lr 1e-4). The released code alternates a step of T and a step
     of the classifier; here both step from one backward pass of the classifier's objective, whose
     gradient in T is ``(1 - alpha)`` times the attack loss's, a scale Adam's update does not see. The
     classifier's SGD runs at the recipe's lr without schedule, as released.
  2. Fine-tuning (the remaining ``epochs - joint_epochs``, 250): the classifier alone, on the same
     objective with T fixed, under the recipe (SGD 0.01, lr / 10 at 50, 100, 150, 200).
``epochs`` counts both phases, as in BackdoorBench. A run killed in either phase resumes there.

``eps`` bounds pixel values in [0, 1] (0.01: 2.55 of 255). BackdoorBench adds ``eps * T(x)`` to
normalised inputs, about a quarter of that in pixels: less than one pixel level, mostly erased when
a record's poisoned sets are rounded to uint8.

The poisoned part of each batch is ``pratio`` of it (relabelled in place, as the other per-batch
attacks do), weighted by ``1 - alpha`` against the clean rest. The classifier trains on what the record
holds: each poisoned image is rounded to the pixel grid, with a straight-through gradient for T.

Record: ``trigger.generator`` (a state dict) and ``trigger.eps`` rebuild exactly the recorded poisoned
test inputs (:func:`generator_from_record`, :func:`lira_poison`); ``bd_train`` is a seeded realisation
of what one epoch of fine-tuning poisons."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UserError
from utils.attack import Attack, register_attack
from utils.config import bounded, positive_float, positive_int, probability, run_main
from utils.evaluate import eval_mode
from utils.poison import backdoor_labels, poisoned_count
from utils.train import CombinedOptimizer, make_optimizer, train

CHUNK = 512              # images per forward pass when poisoning a whole split
DOWNSAMPLINGS = 4        # stride-2 convolutions of the autoencoder
epsilon_bound = bounded(float, 0, 1, low_open=True, name='L-inf bound in (0, 1]')


class Autoencoder(nn.Module):
    """BackdoorBench's LIRA generator for CIFAR-10 (``attack_model: autoencoder``): four 4x4 stride-2
    conv-BN-ReLU layers (16, 32, 64, 128 channels), four 4x4 stride-2 transposed convolutions back to
    the image's channels (BN-ReLU between), and tanh: an output in (-1, 1) per pixel."""

    def __init__(self, channels: int):
        super().__init__()
        widths = [channels, 16, 32, 64, 128]
        encoder, decoder = [], []
        for narrow, wide in zip(widths, widths[1:]):
            encoder += [nn.Conv2d(narrow, wide, 4, stride=2, padding=1), nn.BatchNorm2d(wide), nn.ReLU()]
        for wide, narrow in zip(widths[:0:-1], widths[-2::-1]):
            decoder += [nn.ConvTranspose2d(wide, narrow, 4, stride=2, padding=1), nn.BatchNorm2d(narrow), nn.ReLU()]
        decoder[-2:] = [nn.Tanh()]   # the last layer: tanh instead of BN-ReLU
        self.encoder, self.decoder = nn.Sequential(*encoder), nn.Sequential(*decoder)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def perturb(x: torch.Tensor, generator: nn.Module, eps: float) -> torch.Tensor:
    """``clamp(x + eps * T(x), 0, 1)`` for float images in [0, 1]."""
    return (x + eps * generator(x)).clamp(0, 1)


def to_pixel_grid(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest of the 256 pixel values, with the identity as its gradient."""
    return x + ((x * 255).round() / 255 - x).detach()


@torch.no_grad()
def lira_poison(images: torch.Tensor, generator: nn.Module, eps: float,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8: ``clamp(x + eps * T(x), 0, 1)`` with T in eval mode (its mode is
    restored), rounded to the nearest pixel value."""
    device = device or next(generator.parameters()).device
    out = []
    with eval_mode(generator):
        for chunk in images.split(CHUNK):
            x = chunk.to(device).float().div_(255)
            out.append(perturb(x, generator, eps).mul_(255).round_().to(torch.uint8).cpu())
    return torch.cat(out) if out else images.clone()


def generator_from_record(trigger: dict, input_shape) -> Autoencoder:
    """The generator rebuilt from a record's ``trigger`` entry, in eval mode."""
    generator = Autoencoder(input_shape[0])
    generator.load_state_dict(trigger['generator'])
    return generator.eval()


@register_attack
class LIRA(Attack):
    """LIRA: an imperceptible (L-inf eps 0.01) trigger generator learned jointly with the classifier, then
    the classifier fine-tuned with the generator fixed."""
    name = 'lira'
    per_batch = True
    learned_trigger = True
    sample_specific = True

    def add_arguments(self, parser):
        parser.add_argument('--eps', type=epsilon_bound, default=0.01,
                            help='L-inf bound of the perturbation, in pixel values scaled to [0, 1]')
        parser.add_argument('--alpha', type=probability, default=0.5,
                            help='weight of the clean loss; 1 - alpha weighs the poisoned samples\' loss')
        parser.add_argument('--generator_lr', type=positive_float, default=1e-4, help='Adam learning rate of the generator')
        parser.add_argument('--joint_epochs', type=positive_int, default=50,
                            help='epochs of joint training; the classifier is fine-tuned for the remaining epochs')

    def setup(self, args, spec):
        _, height, width = spec.input_shape
        if height % 2 ** DOWNSAMPLINGS or width % 2 ** DOWNSAMPLINGS:
            raise UserError(f'the generator halves the image {DOWNSAMPLINGS} times: height and width must be multiples '
                            f'of {2 ** DOWNSAMPLINGS}, got {height}x{width}')
        if args.epochs <= args.joint_epochs:
            raise UserError(f'epochs counts the joint and the fine-tuning phase: it must exceed joint_epochs '
                            f'({args.joint_epochs}), got {args.epochs}')
        self.eps, self.alpha, self.pratio = float(args.eps), float(args.alpha), float(args.pratio)
        self.target, self.label_trans, self.num_classes = args.attack_target, args.attack_label_trans, spec.num_classes
        self.poisoned_in_batch = 0   # set by the batch hook, read by the loss

    def prepare(self, ctx):
        with torch.random.fork_rng(devices=[]):   # the generator's initialisation depends on the seed alone
            torch.manual_seed(ctx.args.random_seed)
            self.generator = Autoencoder(ctx.spec.input_shape[0])
        self.generator.to(ctx.device)
        self.device = ctx.device

    def apply_trigger(self, images, *, train, index=None, generator=None):
        return lira_poison(images, self.generator, self.eps, self.device)

    def batch_hook_for(self, learn_trigger: bool):
        """Per-batch poisoning: the first ``pratio`` of the batch perturbed by T (differentiably in the
        joint phase, by the fixed T in eval mode when fine-tuning) and relabelled; None at pratio 0."""
        if self.pratio == 0:
            return None

        def poison_batch(x, y, generator, model):
            count = self.poisoned_in_batch = poisoned_count(self.pratio, len(y), generator)
            if count == 0:
                return x, y
            if learn_trigger:
                poisoned = perturb(x[:count], self.generator, self.eps)
            else:
                with torch.no_grad(), eval_mode(self.generator):
                    poisoned = perturb(x[:count], self.generator, self.eps)
            labels = backdoor_labels(y[:count], self.target, self.label_trans, self.num_classes)
            return torch.cat([to_pixel_grid(poisoned), x[count:]]), torch.cat([labels, y[count:]])
        return poison_batch

    def weighted_loss(self, model, x, y):
        """``alpha * CE(clean part) + (1 - alpha) * CE(poisoned part)``; a part that is absent from the
        batch leaves the other one alone."""
        logits = model(x)
        count = self.poisoned_in_batch
        if count == 0 or count == len(y):
            return F.cross_entropy(logits, y), logits
        clean = F.cross_entropy(logits[count:], y[count:])
        poisoned = F.cross_entropy(logits[:count], y[:count])
        return self.alpha * clean + (1 - self.alpha) * poisoned, logits

    def train_model(self, ctx, model, data, settings):
        args = ctx.args
        common = dict(loss_fn=self.weighted_loss, state_modules={'generator': self.generator}, evaluate_fn=ctx.evaluate,
                      workdir=ctx.folder, resume=args.resume, hflip=ctx.spec.hflip, log=ctx.log)
        joint = dataclasses.replace(settings, epochs=args.joint_epochs, lr_scheduler='none')
        optimizer = CombinedOptimizer(make_optimizer(model.parameters(), joint),
                                      torch.optim.Adam(self.generator.parameters(), args.generator_lr))
        self.generator.train()
        joint_rows = train(model, data, joint, ctx.device, optimizer=optimizer, phase='joint',
                           batch_hook=self.batch_hook_for(learn_trigger=True), desc=f'{self.name} joint', **common)
        self.generator.eval().requires_grad_(False)
        finetune = dataclasses.replace(settings, epochs=settings.epochs - args.joint_epochs)
        finetune_rows = train(model, data, finetune, ctx.device, batch_hook=self.batch_hook_for(learn_trigger=False),
                              desc=f'{self.name} fine-tune', **common)
        return joint_rows + finetune_rows

    def describe_training_poison(self, bd_train, args):
        expected = args.pratio * args.batch_size
        per_batch = (f'one poisoned sample with probability {expected:g}' if expected < 1 else
                     f'{int(expected)} poisoned samples (loss weight {1 - args.alpha:g})')
        return (f'{args.joint_epochs} joint epochs, then {args.epochs - args.joint_epochs} fine-tuning epochs; per batch '
                f'of {args.batch_size}: {per_batch}, perturbed anew by the generator within eps {args.eps:g} (the record '
                f'lists a seeded realisation of {len(bd_train)} poisoned samples)')

    def record_extras(self):
        state = {key: value.detach().cpu() for key, value in self.generator.state_dict().items()}
        return {'trigger': {'generator': state, 'eps': self.eps, 'alpha': self.alpha, 'per_batch': True}}


def main(argv=None):
    return LIRA().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
