"""SSBA (Li et al., "Invisible Backdoor Attack with Sample-Specific Triggers", ICCV 2021): a
StegaStamp encoder (Tancik et al., "StegaStamp: Invisible Hyperlinks in Physical Photographs",
CVPR 2020) hides one fixed secret bit string in every poisoned image. Each image gets its own
invisible residual (the trigger is sample-specific); poisoned images are relabelled (all2one).

Encoder and decoder (trained together, as in StegaStamp): the encoder takes the image and a bit
string (projected by a dense layer to a 16 x 16 plane, upsampled to the image size) and returns a
residual from a small two-level U-Net; the poisoned image is ``clamp(x + residual, 0, 1)``. The
decoder (strided convolutions and a dense head) reads the bits back. Training draws a fresh random
bit string per image and minimises ``w * MSE(x', x) + bit_weight * BCE(decoded, bits)`` with Adam
(StegaStamp's L2 and cross-entropy terms; ``fidelity_weight`` 10 and ``bit_weight`` 1 as in the
StegaStamp training script BackdoorBench ships for SSBA). As there, ``w`` stays 0 until a batch's
bits are read with accuracy above 0.9 and then rises linearly to ``fidelity_weight``. The poisoned
image is rounded to the uint8 grid inside training (straight-through gradient), so the decoder
learns from exactly what the dataset stores. The encoder is trained once per training set and
settings through the artefact cache (``record/.artefacts/ssba_stegastamp-*.pt``) and reused by
later runs; the secret (``secret_seed``) is not one of its inputs, since the encoder hides any bit string.

Departures from the paper, and why:
  * The paper applies a StegaStamp encoder trained on ImageNet (100 bits, a five-level U-Net) to
    resized images, and BackdoorBench loads images poisoned offline; here a small encoder
    (``encoder_width`` 16: 0.1 M parameters, 0.3 M in its decoder) is trained on the dataset's own
    training images at their own resolution, so the attack runs end to end, on a CPU in minutes,
    with no resource files.
  * 32 bits instead of 100: a 32 x 32 image holds 1/49 of a 224 x 224 image's pixels, and the
    backdoor needs one fixed string, not a message; 32 bits keep the decoder's task learnable within
    a few hundred steps while a random string is still not read by chance (2^-32).
  * StegaStamp's perceptual (LPIPS) and adversarial (critic) losses and its simulated physical
    distortions (blur, noise, colour, JPEG, warps) are left out: only the L2 and bit losses remain,
    plus uint8 rounding. Adam's learning rate is 1e-3 for about 1,560 steps rather than
    BackdoorBench's 1e-4 for 20 epochs, and the L2 ramp (``fidelity_ramp``, 500 steps) starts as
    soon as the bits are read (BackdoorBench waits 1,000 steps, then ramps over 3,000).
  * No BCH error-correcting code: the secret is a seeded random bit string.

Record (``trigger``): the encoder's and decoder's weights (state dicts of tensors), the secret, the
settings, the decoder's bit accuracy on the poisoned (and on the clean) test images and the
residual's PSNR, so a defense rebuilds the poisoned inputs with :func:`load_stegastamp` and
:func:`embed_secret`."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import hashlib
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.attack import Attack, register_attack
from utils.config import nonnegative_float, nonnegative_int, positive_float, positive_int, run_main
from utils.data import Split, to_float
from utils.train import TrainSettings, train

CHUNK = 512              # images per encoder / decoder call when poisoning a whole split
SECRET_PLANE = 16        # side of the plane the dense layer projects the bits onto (as in StegaStamp)
MONITOR_IMAGES = 256     # test images on which each encoder epoch reports bit accuracy and PSNR
ARCHITECTURE = 'unet2-v1'  # part of the cached encoder's key: a changed network never reuses old weights


def conv_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1), nn.ReLU(inplace=True))


class StegaStampEncoder(nn.Module):
    """(images in [0, 1], bits in {0, 1}) -> residual (same shape as the images): a two-level U-Net
    over the image and the bits' plane, with skip connections (StegaStamp's shape, scaled down)."""

    def __init__(self, bits: int, channels: int = 3, width: int = 16):
        super().__init__()
        self.bits, self.channels, self.width = bits, channels, width
        self.secret_dense = nn.Linear(bits, SECRET_PLANE * SECRET_PLANE)
        inputs = channels + 1
        self.level0 = conv_relu(inputs, width)
        self.level1 = conv_relu(width, 2 * width, stride=2)
        self.level2 = nn.Sequential(conv_relu(2 * width, 4 * width, stride=2), conv_relu(4 * width, 4 * width))
        self.up1 = conv_relu(4 * width + 2 * width, 2 * width)
        self.up0 = conv_relu(2 * width + width + inputs, width)
        self.to_residual = nn.Conv2d(width, channels, 1)

    def forward(self, images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        plane = F.relu(self.secret_dense(bits - 0.5)).view(-1, 1, SECRET_PLANE, SECRET_PLANE)
        plane = F.interpolate(plane, size=images.shape[-2:], mode='nearest')
        inputs = torch.cat([images, plane.expand(len(images), -1, -1, -1)], dim=1)
        level0 = self.level0(inputs)
        level1 = self.level1(level0)
        level2 = self.level2(level1)
        up1 = self.up1(torch.cat([F.interpolate(level2, size=level1.shape[-2:]), level1], dim=1))
        up0 = self.up0(torch.cat([F.interpolate(up1, size=level0.shape[-2:]), level0, inputs], dim=1))
        return self.to_residual(up0)


class StegaStampDecoder(nn.Module):
    """images in [0, 1] -> one logit per hidden bit."""

    def __init__(self, bits: int, channels: int = 3, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(conv_relu(channels, width), conv_relu(width, 2 * width, stride=2),
                                      conv_relu(2 * width, 4 * width, stride=2),
                                      conv_relu(4 * width, 4 * width, stride=2),
                                      nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(4 * width * 16, 256), nn.ReLU(inplace=True), nn.Linear(256, bits))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class StegaStamp(nn.Module):
    """Encoder and decoder as one module, so the toolkit's one training loop trains them together."""

    def __init__(self, bits: int, channels: int = 3, width: int = 16):
        super().__init__()
        self.bits = bits
        self.encoder = StegaStampEncoder(bits, channels, width)
        self.decoder = StegaStampDecoder(bits, channels, width)

    def embed(self, images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """``clamp(x + residual, 0, 1)`` rounded to the uint8 grid, with a straight-through gradient."""
        poisoned = (images + self.encoder(images, bits)).clamp(0, 1)
        return poisoned + ((poisoned * 255).round() / 255 - poisoned).detach()


class StegaStampLoss:
    """``w * MSE(x', x) + bit_weight * BCE(decoder(x'), bits)`` for a fresh random bit string per
    image, drawn from a seeded generator (the training labels are ignored). As in StegaStamp's
    training, ``w`` is 0 until a batch's bits are read with accuracy above 0.9, then rises linearly
    to ``fidelity_weight`` over ``fidelity_ramp`` steps: an image-fidelity term from the start drives
    the residual to zero before the decoder has learnt anything to read."""

    def __init__(self, bits: int, fidelity_weight: float, bit_weight: float, fidelity_ramp: int, seed: int):
        self.bits, self.fidelity_weight, self.bit_weight = bits, fidelity_weight, bit_weight
        self.fidelity_ramp = fidelity_ramp
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_since_readable: int | None = None   # None until a batch's bits are first read above 0.9

    @property
    def current_fidelity_weight(self) -> float:
        if self.steps_since_readable is None:
            return 0.0
        return self.fidelity_weight * min(1.0, self.steps_since_readable / max(1, self.fidelity_ramp))

    def __call__(self, model: StegaStamp, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        bits = torch.randint(0, 2, (len(images), self.bits), generator=self.generator).float().to(images.device)
        poisoned = model.embed(images, bits)
        logits = model.decoder(poisoned).float()
        loss = (self.current_fidelity_weight * F.mse_loss(poisoned.float(), images)
                + self.bit_weight * F.binary_cross_entropy_with_logits(logits, bits))
        if self.steps_since_readable is not None:
            self.steps_since_readable += 1
        elif ((logits > 0).float() == bits).float().mean().item() > 0.9:
            self.steps_since_readable = 0
        return loss


@torch.inference_mode()
def embed_secret(encoder: StegaStampEncoder, images: torch.Tensor, secret: torch.Tensor,
                 device: torch.device | str = 'cpu') -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 images hiding ``secret`` (bits, or one bit string per image):
    ``round(255 * clamp(x + encoder(x, secret), 0, 1))``, in float32 on ``device``."""
    encoder = encoder.to(device).eval()
    bits = secret.float().to(device)
    out, start = [], 0
    for chunk in images.split(CHUNK):
        x = to_float(chunk.to(device))
        chunk_bits = bits[start:start + len(chunk)] if bits.dim() == 2 else bits[None]
        poisoned = (x + encoder(x, chunk_bits)).clamp_(0, 1)
        out.append(poisoned.mul_(255).round_().to(torch.uint8).cpu())
        start += len(chunk)
    return torch.cat(out) if out else images.clone()


@torch.inference_mode()
def decode_bits(decoder: StegaStampDecoder, images: torch.Tensor,
                device: torch.device | str = 'cpu') -> torch.Tensor:
    """uint8 (N, C, H, W) -> the decoded bits, uint8 (N, bits)."""
    decoder = decoder.to(device).eval()
    out = [(decoder(to_float(chunk.to(device))) > 0).to(torch.uint8).cpu() for chunk in images.split(CHUNK)]
    return torch.cat(out) if out else torch.empty(0, decoder.head[-1].out_features, dtype=torch.uint8)


def bit_accuracy(decoder: StegaStampDecoder, images: torch.Tensor, secret: torch.Tensor,
                 device: torch.device | str = 'cpu') -> float:
    """Fraction of ``secret``'s bits (one string, or one per image) the decoder reads from ``images``."""
    decoded = decode_bits(decoder, images, device)
    if not len(decoded):
        return float('nan')
    return (decoded == secret.to(torch.uint8).expand_as(decoded)).float().mean().item()


def psnr(clean: torch.Tensor, poisoned: torch.Tensor) -> float:
    """PSNR in dB of uint8 ``poisoned`` against ``clean``, the MSE taken over every pixel of the set."""
    mse = (poisoned.double() - clean.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def train_stegastamp(images: torch.Tensor, *, bits: int, width: int, epochs: int, batch_size: int, lr: float,
                     fidelity_weight: float, bit_weight: float, fidelity_ramp: int, seed: int,
                     device: torch.device, amp: bool = True, monitor: torch.Tensor | None = None, log=print) -> dict:
    """Train encoder and decoder on uint8 ``images`` with Adam through the toolkit's training loop;
    each epoch logs the bit accuracy and PSNR on ``monitor`` images (random seeded bit strings).
    Returns the artefact: both state dicts (CPU), the per-epoch rows and the training time."""
    started = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StegaStamp(bits, images.shape[1], width)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, lr_scheduler='none', amp=amp, seed=seed,
                             augment=False)
    loss = StegaStampLoss(bits, fidelity_weight, bit_weight, fidelity_ramp, seed)
    monitored = monitor is not None and len(monitor) > 0
    if monitored:
        monitor_bits = torch.randint(0, 2, (len(monitor), bits), generator=torch.Generator().manual_seed(seed + 1))

    def monitor_secret(trained):
        poisoned = embed_secret(trained.encoder, monitor, monitor_bits, device)
        return {'bit_accuracy': bit_accuracy(trained.decoder, poisoned, monitor_bits, device),
                'psnr': psnr(monitor, poisoned), 'fidelity_weight': loss.current_fidelity_weight}
    evaluate_fn = monitor_secret if monitored else None
    data = Split(images, torch.zeros(len(images), dtype=torch.int64))
    rows = train(model, data, settings, device, optimizer=optimizer, loss_fn=loss, evaluate_fn=evaluate_fn,
                 log=log, desc='ssba encoder')
    model.cpu()
    return {'encoder': model.encoder.state_dict(), 'decoder': model.decoder.state_dict(), 'rows': rows,
            'steps': epochs * math.ceil(len(images) / batch_size), 'seconds': round(time.time() - started, 2)}


def load_stegastamp(trigger: dict) -> tuple[StegaStampEncoder, StegaStampDecoder]:
    """A record's ``trigger`` -> its encoder and decoder (CPU, eval mode)."""
    encoder = StegaStampEncoder(trigger['bits'], trigger['channels'], trigger['width'])
    decoder = StegaStampDecoder(trigger['bits'], trigger['channels'], trigger['width'])
    encoder.load_state_dict(trigger['encoder'])
    decoder.load_state_dict(trigger['decoder'])
    return encoder.eval(), decoder.eval()


def images_digest(images: torch.Tensor) -> str:
    """SHA-256 of a uint8 image tensor's bytes: the encoder's training images, as a cache key."""
    return hashlib.sha256(images.contiguous().numpy()).hexdigest()


@register_attack
class SSBA(Attack):
    """SSBA: a StegaStamp encoder, trained on the training images, hides a fixed seeded secret (32 bits)
    in each poisoned image as its own invisible residual; relabelled to the target."""
    name = 'ssba'
    sample_specific = True

    def add_arguments(self, parser):
        parser.add_argument('--bits', type=positive_int, default=32, help='length of the hidden secret bit string')
        parser.add_argument('--secret_seed', type=nonnegative_int, default=0,
                            help='seed of the secret bit string (independent of random_seed and of the encoder)')
        parser.add_argument('--encoder_width', type=positive_int, default=16,
                            help='channels of the first encoder / decoder level (doubled twice below it)')
        parser.add_argument('--encoder_epochs', type=positive_int, default=2,
                            help='epochs of encoder / decoder training over encoder_images')
        parser.add_argument('--encoder_images', type=nonnegative_int, default=0,
                            help='training images the encoder learns from, a seeded subset (0, or more than the '
                                 'training split holds: all of them)')
        parser.add_argument('--encoder_batch_size', type=positive_int, default=64, help='encoder / decoder batch size')
        parser.add_argument('--encoder_lr', type=positive_float, default=1e-3, help='Adam learning rate of the encoder')
        parser.add_argument('--fidelity_weight', type=nonnegative_float, default=10.0,
                            help='weight of the L2 image-fidelity loss (higher: fainter residual, fewer bits read)')
        parser.add_argument('--bit_weight', type=positive_float, default=1.0,
                            help='weight of the bit-recovery (binary cross-entropy) loss')
        parser.add_argument('--fidelity_ramp', type=nonnegative_int, default=500,
                            help='steps over which the fidelity weight rises from 0, once the bits are first read '
                                 'with accuracy above 0.9')
        parser.add_argument('--encoder_seed', type=nonnegative_int, default=0,
                            help='seed of the encoder: its initialisation, its images and its training bit strings')

    def setup(self, args, spec):
        self.channels = spec.input_shape[0]
        self.encoder_settings = {'bits': args.bits, 'width': args.encoder_width, 'epochs': args.encoder_epochs,
                                 'batch_size': args.encoder_batch_size, 'lr': float(args.encoder_lr),
                                 'fidelity_weight': float(args.fidelity_weight), 'bit_weight': float(args.bit_weight),
                                 'fidelity_ramp': args.fidelity_ramp, 'seed': args.encoder_seed}
        self.encoder_images, self.secret_seed = args.encoder_images, args.secret_seed
        generator = torch.Generator().manual_seed(args.secret_seed)
        self.secret = torch.randint(0, 2, (args.bits,), generator=generator, dtype=torch.uint8)
        self.device, self.log = torch.device('cpu'), print
        self.measured: dict = {}

    def prepare(self, ctx):
        self.device, self.log = ctx.device, ctx.log
        images = ctx.train.images
        if 0 < self.encoder_images < len(images):
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.encoder_settings['seed']))
            images = images[order[:self.encoder_images].sort().values]
        inputs = {'architecture': ARCHITECTURE, 'dataset': ctx.args.dataset, 'images': len(images),
                  'images_sha256': images_digest(images), **self.encoder_settings}
        artefact = ctx.artefact('ssba_stegastamp', inputs, lambda: train_stegastamp(
            images, **self.encoder_settings, device=ctx.device, amp=ctx.args.amp,
            monitor=ctx.test.images[:MONITOR_IMAGES], log=ctx.log))
        self.encoder_state, self.decoder_state = artefact['encoder'], artefact['decoder']
        self.encoder_training = {'images': len(images), 'steps': artefact['steps'], 'seconds': artefact['seconds']}
        self.encoder, self.decoder = load_stegastamp(self.trigger_weights())
        ctx.log(f'ssba encoder: {artefact["steps"]} steps on {len(images)} training images '
                f'({artefact["seconds"]:.1f} s when trained)')

    def trigger_weights(self) -> dict:
        return {'encoder': self.encoder_state, 'decoder': self.decoder_state, 'bits': self.encoder_settings['bits'],
                'width': self.encoder_settings['width'], 'channels': self.channels}

    def apply_trigger(self, images, *, train, index=None, generator=None):
        return embed_secret(self.encoder, images, self.secret, self.device)

    def poison_test(self, test, args, spec):
        """The base's poisoned test set; measures how well the decoder reads the secret from it and the
        residual's PSNR (logged and recorded)."""
        bd_test = super().poison_test(test, args, spec)
        clean = test.images[bd_test.index]
        self.measured = {'bit_accuracy': bit_accuracy(self.decoder, bd_test.images, self.secret, self.device),
                         'clean_bit_accuracy': bit_accuracy(self.decoder, clean, self.secret, self.device),
                         'psnr': psnr(clean, bd_test.images)}
        measured = self.measured
        self.log(f'ssba: the decoder recovers {measured["bit_accuracy"]:.3f} of the {len(self.secret)} secret bits '
                 f'from the poisoned test images ({measured["clean_bit_accuracy"]:.3f} from the clean ones); '
                 f'residual PSNR {measured["psnr"]:.2f} dB')
        if self.measured['bit_accuracy'] < 0.9:
            self.log('ssba: the encoder hides the secret poorly (bit accuracy < 0.9): raise encoder_epochs or '
                     'encoder_images, or lower fidelity_weight')
        return bd_test

    def record_extras(self):
        return {'trigger': self.trigger_weights() | {
            'secret': self.secret, 'secret_seed': self.secret_seed, 'settings': dict(self.encoder_settings),
            'encoder_training': dict(self.encoder_training), **self.measured}}


def main(argv=None):
    return SSBA().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
