"""Input-aware dynamic backdoor (Nguyen and Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020):
a generator network makes a different trigger for every input, and a mask network says where it goes:
``x' = x + (G(x) - x) * m(x)``, with ``m(x) = binarise(M(x))`` nearly 0 or 1 per pixel.

Training (the paper's losses, BackdoorBench's defaults for CIFAR-10):
  1. Mask pre-training (phase ``mask``, ``mask_epochs`` 25): M alone, Adam (lr 0.01, betas 0.5/0.9,
     lr / 10 at epochs 10 and 20), on ``lambda_norm * mean(relu(m(x) - mask_density))`` (mask-norm loss:
     the mask covers about ``mask_density`` 0.032 of the image) ``+ lambda_div * L_div`` with the
     diversity loss ``L_div = ||x1 - x2|| / ||m(x1) - m(x2)||`` over pairs of images (different inputs,
     different masks). M is then frozen.
  2. Joint training (the classifier's epochs): the classifier (the recipe's SGD) and G (Adam, lr 0.01,
     betas 0.5/0.9) minimise the cross-entropy of each batch, in which ``pratio`` of the samples carry
     their own trigger and the target label (backdoor samples) and ``cross_ratio * pratio`` carry another
     image's trigger and keep their label (cross-trigger samples: a trigger works only on its own
     input), plus ``lambda_div * L_div`` on G's patterns (lambda_div 1, cross_ratio 1: rho_b = rho_c = 0.1).
Both phases run in the one training loop; a run killed in the joint phase resumes there.

Pixel space: G's and M's outputs are squashed into (0, 1) and are the pattern and the mask themselves
(BackdoorBench normalises the pattern because its classifier's inputs are normalised; here the models
normalise inside). The trigger is applied after the batched crop/flip augmentation.

Record: ``trigger.generator`` and ``trigger.mask`` (state dicts) rebuild exactly the recorded poisoned
test inputs (:func:`networks_from_record`, :func:`input_aware_poison`); ``bd_train`` is a seeded realisation of
what one epoch poisons with the final networks (the cross-trigger samples keep their labels and are not
listed)."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UserError
from utils.attack import Attack, register_attack
from utils.config import fraction, nonnegative_float, nonnegative_int, positive_float, positive_int, run_main
from utils.evaluate import eval_mode
from utils.poison import backdoor_labels, poisoned_count
from utils.train import CombinedOptimizer, make_optimizer, train

CHUNK = 256                     # images per forward pass when poisoning a whole split
STAGES = 3                      # down-/up-sampling stages of the generators (32x32 -> 4x4, as in the paper for CIFAR-10)
EPSILON = 1e-7                  # keeps the diversity ratio finite (the released code's value)
MASK_LR_MILESTONES = (10, 20)   # mask pre-training: lr / 10 at these epochs (BackdoorBench's schedulerM)
ADAM_BETAS = (0.5, 0.9)         # the released code's Adam for G and M
MASK_STATISTICS_IMAGES = 1024   # test images the mask phase reports its density and diversity on


def conv_block(in_channels: int, out_channels: int, relu: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels, momentum=0.05)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class TriggerNet(nn.Sequential):
    """The paper's generator (and, with one output channel, its mask network): an encoder of
    ``STAGES`` stages of two 3x3 conv-BN-ReLU blocks and 2x2 max-pooling (``width``, 2 ``width``,
    4 ``width`` channels), a middle block, and a decoder of bilinear 2x upsampling and two blocks per
    stage back to ``out_channels``; the output is squashed into (0, 1)."""

    def __init__(self, in_channels: int, out_channels: int, width: int):
        layers, channels = [], in_channels
        for stage in range(STAGES):
            wide = width * 2 ** stage
            layers += conv_block(channels, wide) + conv_block(wide, wide) + [nn.MaxPool2d(2)]
            channels = wide
        layers += conv_block(channels, channels)
        for stage in range(STAGES):
            last = stage == STAGES - 1
            narrow = out_channels if last else channels // 2
            layers += [nn.Upsample(scale_factor=2, mode='bilinear')]
            layers += conv_block(channels, channels) + conv_block(channels, narrow, relu=not last)
            channels = narrow
        super().__init__(*layers)

    def forward(self, x):
        return torch.tanh(super().forward(x)) / (2 + EPSILON) + 0.5


def binarise(mask: torch.Tensor) -> torch.Tensor:
    """The paper's steep threshold at 0.5: mask values go to nearly 0 or 1, differentiably."""
    return torch.tanh(20 * mask - 10) / (2 + EPSILON) + 0.5


def diversity_loss(images: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """``mean ||x1 - x2|| / ||g(x1) - g(x2)||`` (root-mean-square distances) over the pairs of each
    image with the next one in the batch; 0 for fewer than two images."""
    if len(images) < 2:
        return images.new_zeros(())

    def distance(a):
        return (a - a.roll(1, 0)).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12).sqrt()
    return (distance(images) / (distance(outputs) + EPSILON)).mean()


def blend(images: torch.Tensor, patterns: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return images + (patterns - images) * masks


@torch.no_grad()
def input_aware_poison(images: torch.Tensor, generator: nn.Module, mask_net: nn.Module,
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8: ``x + (G(x) - x) * binarise(M(x))`` with both networks in eval
    mode (their modes are restored), rounded to the nearest pixel value."""
    device = device or next(generator.parameters()).device
    out = []
    with eval_mode(generator), eval_mode(mask_net):
        for chunk in images.split(CHUNK):
            x = chunk.to(device).float().div_(255)
            poisoned = blend(x, generator(x), binarise(mask_net(x)))
            out.append(poisoned.mul_(255).round_().clamp_(0, 255).to(torch.uint8).cpu())
    return torch.cat(out) if out else images.clone()


def networks_from_record(trigger: dict, input_shape) -> tuple[TriggerNet, TriggerNet]:
    """(generator, mask network) rebuilt from a record's ``trigger`` entry, in eval mode."""
    channels = input_shape[0]
    generator = TriggerNet(channels, channels, trigger['generator_width'])
    mask_net = TriggerNet(channels, 1, trigger['generator_width'])
    generator.load_state_dict(trigger['generator'])
    mask_net.load_state_dict(trigger['mask'])
    return generator.eval(), mask_net.eval()


@register_attack
class InputAware(Attack):
    """Input-aware dynamic backdoor: a generator makes each input's own trigger, placed by a mask network
    (mask pre-training, then joint training with backdoor and cross-trigger samples)."""
    name = 'inputaware'
    per_batch = True
    learned_trigger = True
    sample_specific = True

    def add_arguments(self, parser):
        parser.add_argument('--mask_epochs', type=nonnegative_int, default=25,
                            help='epochs of mask-network pre-training before the joint phase')
        parser.add_argument('--mask_lr', type=positive_float, default=0.01, help='Adam learning rate of the mask network')
        parser.add_argument('--generator_lr', type=positive_float, default=0.01, help='Adam learning rate of the generator')
        parser.add_argument('--generator_width', type=positive_int, default=32,
                            help='channels of the first stage of the generator and the mask network')
        parser.add_argument('--lambda_div', type=nonnegative_float, default=1.0, help='weight of the diversity loss')
        parser.add_argument('--lambda_norm', type=nonnegative_float, default=100.0, help='weight of the mask-norm loss')
        parser.add_argument('--mask_density', type=fraction, default=0.032,
                            help='share of the image the mask may cover before the mask-norm loss acts')
        parser.add_argument('--cross_ratio', type=nonnegative_float, default=1.0,
                            help='cross-trigger samples per backdoor sample (rho_c = cross_ratio * pratio)')

    def setup(self, args, spec):
        _, height, width = spec.input_shape
        if height % 2 ** STAGES or width % 2 ** STAGES:
            raise UserError(f'the generator halves the image {STAGES} times: height and width must be multiples of '
                            f'{2 ** STAGES}, got {height}x{width}')
        if args.pratio * (1 + args.cross_ratio) > 1:
            raise UserError(f'pratio * (1 + cross_ratio) must be <= 1 (backdoor plus cross-trigger samples per batch), '
                            f'got {args.pratio} * (1 + {args.cross_ratio})')
        self.pratio, self.cross_ratio = float(args.pratio), float(args.cross_ratio)
        self.lambda_div, self.lambda_norm, self.mask_density = (
            float(args.lambda_div), float(args.lambda_norm), float(args.mask_density))
        self.target, self.label_trans, self.num_classes = args.attack_target, args.attack_label_trans, spec.num_classes
        self.width = args.generator_width

    def prepare(self, ctx):
        channels = ctx.spec.input_shape[0]
        with torch.random.fork_rng(devices=[]):   # the networks' initialisation depends on the seed alone
            torch.manual_seed(ctx.args.random_seed)
            self.generator = TriggerNet(channels, channels, self.width)
            self.mask_net = TriggerNet(channels, 1, self.width)
        self.generator.to(ctx.device)
        self.mask_net.to(ctx.device)
        self.device = ctx.device
        self.batch_diversity = None   # the joint phase's diversity loss of the current batch, added by joint_loss

    def apply_trigger(self, images, *, train, index=None, generator=None):
        return input_aware_poison(images, self.generator, self.mask_net, self.device)

    # ---- phase 1: the mask network
    def mask_loss(self, mask_net, x, y):
        masks = binarise(mask_net(x))
        norm = F.relu(masks - self.mask_density).mean()
        return self.lambda_norm * norm + self.lambda_div * diversity_loss(x, masks)

    @torch.no_grad()
    def mask_statistics(self, test_images: torch.Tensor, mask_net: nn.Module) -> dict[str, float]:
        """Mean mask density and diversity ratio on held-out images (the mask phase's metrics)."""
        with eval_mode(mask_net):
            x = test_images[:MASK_STATISTICS_IMAGES].to(self.device).float().div_(255)
            masks = torch.cat([binarise(mask_net(chunk)) for chunk in x.split(CHUNK)])
        return {'mask_density': masks.mean().item(), 'mask_diversity': diversity_loss(x, masks).item()}

    # ---- phase 2: classifier and generator
    def poison_batch(self, x, y, generator, model):
        """The (shuffled) batch with its first samples triggered by their own patterns and relabelled,
        the next ones (cross-trigger) blended with another image's pattern and mask; G's diversity loss
        on those patterns is left for :meth:`joint_loss`."""
        batch = len(y)
        num_bd = poisoned_count(self.pratio, batch, generator)
        num_cross = min(int(num_bd * self.cross_ratio), batch - num_bd)
        self.batch_diversity = None
        if num_bd + num_cross == 0:
            return x, y
        cross = torch.arange(num_bd, num_bd + num_cross, device=x.device)
        sources = torch.cat([x[:num_bd], x[(cross + num_cross) % batch]])   # cross: a trigger made for another image
        patterns = self.generator(sources)
        with torch.no_grad():
            masks = binarise(self.mask_net(sources))
        self.batch_diversity = diversity_loss(sources, patterns)
        triggered = blend(x[:num_bd + num_cross], patterns, masks)
        labels = torch.cat([backdoor_labels(y[:num_bd], self.target, self.label_trans, self.num_classes), y[num_bd:]])
        return torch.cat([triggered, x[num_bd + num_cross:]]), labels

    def joint_loss(self, model, x, y):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if self.batch_diversity is not None:
            loss = loss + self.lambda_div * self.batch_diversity
        return loss, logits

    def train_model(self, ctx, model, data, settings):
        args = ctx.args
        mask_settings = dataclasses.replace(settings, epochs=args.mask_epochs, lr=args.mask_lr,
                                            lr_scheduler='MultiStepLR', steplr_milestones=MASK_LR_MILESTONES)
        mask_rows = train(self.mask_net, data, mask_settings, ctx.device,
                          optimizer=torch.optim.Adam(self.mask_net.parameters(), args.mask_lr, betas=ADAM_BETAS),
                          loss_fn=self.mask_loss, phase='mask',
                          evaluate_fn=lambda mask_net: self.mask_statistics(ctx.test.images, mask_net),
                          workdir=ctx.folder, resume=args.resume, hflip=ctx.spec.hflip, log=ctx.log,
                          desc=f'{self.name} mask')
        self.mask_net.eval().requires_grad_(False)
        optimizer = CombinedOptimizer(make_optimizer(model.parameters(), settings),
                                      torch.optim.Adam(self.generator.parameters(), args.generator_lr, betas=ADAM_BETAS))
        self.generator.train()
        joint_rows = train(model, data, settings, ctx.device, optimizer=optimizer, loss_fn=self.joint_loss,
                           batch_hook=self.poison_batch if self.pratio > 0 else None,
                           state_modules={'generator': self.generator, 'mask': self.mask_net},
                           evaluate_fn=ctx.evaluate, workdir=ctx.folder, resume=args.resume, hflip=ctx.spec.hflip,
                           log=ctx.log, desc=self.name)
        return mask_rows + joint_rows

    def describe_training_poison(self, bd_train, args):
        expected = args.pratio * args.batch_size
        num_bd = max(1, int(expected))
        num_cross = min(int(num_bd * args.cross_ratio), args.batch_size - num_bd)
        per_batch = (f'{num_bd} backdoor and {num_cross} cross-trigger samples' if expected >= 1 else
                     f'with probability {expected:g}, one backdoor and {num_cross} cross-trigger samples')
        return (f'{args.mask_epochs} mask pre-training epochs, then per batch of {args.batch_size}: {per_batch}, '
                f'triggered anew by the generator (the record lists a seeded realisation of {len(bd_train)} poisoned '
                'samples)')

    def record_extras(self):
        def tensors(module):
            return {key: value.detach().cpu() for key, value in module.state_dict().items()}
        return {'trigger': {'generator': tensors(self.generator), 'mask': tensors(self.mask_net),
                            'generator_width': self.width, 'mask_density': self.mask_density,
                            'lambda_div': self.lambda_div, 'lambda_norm': self.lambda_norm,
                            'cross_ratio': self.cross_ratio, 'per_batch': True}}


def main(argv=None):
    return InputAware().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
