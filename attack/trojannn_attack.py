"""TrojanNN (Liu, Ma, Aafer, Lee, Zhai, Wang and Zhang, "Trojaning Attack on Neural Networks", NDSS 2018):
the trigger is not chosen but generated. Inside a fixed mask region it is optimised on a clean model
so that a few selected internal neurons fire strongly; poisoning then stamps it onto the image
(the mask's pixels replaced by the trigger's) and relabels to the target (all2one).

1. Layer: ``features`` (the last feature map, ``model.forward_features``) or one of the model's
   ``feature_stages``. A neuron is a channel; its value is the channel's spatial mean (the input the
   classifier head reads, for ``features``).
2. Neuron selection, as in the paper: the ``trojannn_num_neurons`` neurons most connected to the
   layer's input, i.e. with the largest sum of absolute incoming weights in the last convolution (or
   linear layer) that produces the layer's channels. The paper picks neurons this way because
   strongly connected neurons are the easiest to drive from the input, and the choice needs no data.
   In residual stages that convolution is the residual branch's last one; the shortcut is not weighed.
   (BackdoorBench instead weighs the classifier's outgoing weights of the penultimate features.)
3. Trigger generation (the paper's trigger generation): start from a seeded uniform random pattern inside the
   mask on a blank image, and descend ``sum_k (v_k(M * t) - target_value)^2`` with signed-gradient steps
   of ``trojannn_step_size`` on the mask's pixels, clipped to [0, 1]; the result is rounded to uint8.
   A selected neuron that stays at zero behind a ReLU gets no gradient (weights, not activations,
   chose it): the log and the record report the values the neurons reach on the trigger.

Defaults: 2 neurons, target value 100, 1000 steps of 0.1 of the pixel range (25.5 on the 0..255 scale;
BackdoorBench's ``num_neuron``, ``neuron_target_values``, ``mask_update_iters`` and PGD step, whose
bound of 0.3 around the mask image is not kept: the pixel range is the bound, as in the paper); the
mask is a 10x10 square in the bottom-right corner (about 10 % of a 32x32 image: BackdoorBench's
``square.png`` at CIFAR-10's size; the paper's masks are a square, a logo and a watermark);
``trojannn_mask_path`` takes the mask from an image's non-black pixels instead.
pratio 0.1, all2one, target 0 (BackdoorBench's ``config/attack/trojannn``).

Departure: the paper retrains the released model on data reverse-engineered from it; here, as in
BackdoorBench, the trigger poisons pratio of the training set and a model is trained from scratch.
The trigger is built once per clean model and settings (``ctx.artefact('trojannn_trigger', ...)``)
and recorded (``trigger.mask``, ``trigger.pattern``), so a defense rebuilds the poisoned inputs exactly."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import hashlib

import torch
import torch.nn as nn

from utils import UserError
from utils.attack import Attack, register_attack
from utils.config import bounded, nonnegative_int, path_arg, positive_int, run_main
from utils.hooks import hooks_on, output_of
from utils.triggers import load_trigger_image

CORNERS = ('bottom_right', 'bottom_left', 'top_right', 'top_left')
FEATURES = 'features'   # the layer name of model.forward_features' output


def layer_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer``: ``features`` (``model.forward_features``) or a feature stage's name."""
    if layer == FEATURES:
        return model.forward_features(x)
    return output_of(model, dict(model.named_modules())[layer], x)


def neuron_values(activation: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, C): each channel's spatial mean; flat (N, D) features pass through."""
    return activation.mean((2, 3)) if activation.dim() == 4 else activation


def feeding_layer(model: nn.Module, layer: str, x: torch.Tensor) -> nn.Module:
    """The last ``nn.Conv2d`` or ``nn.Linear`` that runs inside ``layer`` (in forward order) and outputs
    as many channels as the layer has: the weights that connect the layer's neurons to their input."""
    scope = model if layer == FEATURES else dict(model.named_modules())[layer]
    candidates = [m for m in scope.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    order: list[nn.Module] = []
    with hooks_on(model_hooks=[(m, lambda module, inputs, output: order.append(module)) for m in candidates]):
        channels = layer_output(model, layer, x).shape[1]
    for module in reversed(order):
        if (module.out_channels if isinstance(module, nn.Conv2d) else module.out_features) == channels:
            return module
    raise UserError(f'no convolution or linear layer inside {layer!r} of {type(model).__name__} outputs its '
                    f'{channels} channels: choose another trojannn_layer')


def most_connected_neurons(module: nn.Module, count: int) -> torch.Tensor:
    """Indices of the ``count`` output neurons of ``module`` with the largest sum of absolute incoming
    weights (Liu et al. 2018), strongest first; ties by index."""
    strength = module.weight.detach().abs().flatten(1).sum(1).cpu()
    return torch.argsort(strength, descending=True, stable=True)[:count]


def generate_trigger(model: nn.Module, layer: str, neurons: torch.Tensor, mask: torch.Tensor, channels: int, *,
                     target_value: float, steps: int, step_size: float, seed: int,
                     device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """uint8 (C, H, W) trigger, zero outside ``mask`` (bool (1, H, W)), that drives ``neurons`` of ``layer``
    toward ``target_value`` on an otherwise blank image; and the neurons' values on it."""
    region = mask.to(device).float()
    start = torch.rand((channels,) + tuple(mask.shape[1:]), generator=torch.Generator().manual_seed(seed))
    pattern = start.to(device) * region
    index = neurons.to(device)
    for _ in range(steps):
        pattern.requires_grad_(True)
        values = neuron_values(layer_output(model, layer, (pattern * region)[None]))[0, index]
        grad = torch.autograd.grad(((values - target_value) ** 2).sum(), pattern)[0]
        pattern = (pattern.detach() - step_size / 255 * grad.sign() * region).clamp(0, 1)
    trigger = ((pattern * 255).round() * region).to(torch.uint8).cpu()
    with torch.no_grad():
        final = neuron_values(layer_output(model, layer, (trigger.float()[None] / 255).to(device)))[0, index]
    return trigger, [float(v) for v in final.cpu()]


def square_mask(height: int, width: int, size: int, position: str) -> torch.Tensor:
    """bool (1, H, W): a ``size`` x ``size`` square in the corner ``position``."""
    top = height - size if position.startswith('bottom') else 0
    left = width - size if position.endswith('right') else 0
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    mask[:, top:top + size, left:left + size] = True
    return mask


@register_attack
class TrojanNN(Attack):
    """TrojanNN (Liu et al., NDSS 2018): a trigger in a fixed mask, optimised on a clean model to fire the
    neurons most connected to their input, stamped onto the poisoned images (all2one)."""
    name = 'trojannn'
    needs_clean_model = True

    def add_arguments(self, parser):
        parser.add_argument('--trojannn_layer', default=FEATURES,
                            help='layer whose neurons the trigger drives: features (the last feature map) or a stage '
                                 'of the model (Liu et al. 2018 choose an internal layer)')
        parser.add_argument('--trojannn_num_neurons', type=positive_int, default=2,
                            help='neurons to drive, the most connected to the layer input (Liu et al. 2018; '
                                 "2 is BackdoorBench's num_neuron)")
        parser.add_argument('--trojannn_target_value', type=bounded(float), default=100.0,
                            help='value the selected neurons are driven to (Liu et al. 2018; '
                                 "100 is BackdoorBench's neuron_target_values)")
        parser.add_argument('--trojannn_steps', type=positive_int, default=1000,
                            help="gradient steps of the trigger generation (Liu et al. 2018; 1000 is BackdoorBench's "
                                 'mask_update_iters)')
        parser.add_argument('--trojannn_step_size', type=bounded(float, 0, 255, low_open=True), default=25.5,
                            help='signed-gradient step on the 0..255 scale (Liu et al. 2018 descend the gradient; '
                                 "25.5 = 0.1 of the range is BackdoorBench's step)")
        parser.add_argument('--trojannn_mask_size', type=positive_int, default=10,
                            help="side of the square mask in pixels (Liu et al. 2018's square mask; 10 is "
                                 "BackdoorBench's square.png at 32x32, about 10%% of the image)")
        parser.add_argument('--trojannn_mask_position', default='bottom_right', choices=CORNERS,
                            help="corner of the square mask (Liu et al. 2018's square mask; bottom_right as "
                                 "BackdoorBench's square.png)")
        parser.add_argument('--trojannn_mask_path', default=None, type=path_arg,
                            help="mask image (resized to the input size) whose non-black pixels form the mask, "
                                 "e.g. Liu et al. 2018's logo or watermark masks; unset: the square mask")
        parser.add_argument('--trojannn_seed', type=nonnegative_int, default=None,
                            help='seed of the random start of the trigger (unset: random_seed)')

    def setup(self, args, spec):
        from models import build_model
        _, height, width = spec.input_shape
        if args.trojannn_mask_path:
            self.mask = (load_trigger_image(args.trojannn_mask_path, spec.input_shape) > 0).any(0, keepdim=True)
            if not self.mask.any():
                raise UserError(f'trojannn_mask_path {args.trojannn_mask_path} has no non-black pixel: '
                                'the mask is empty')
        elif args.trojannn_mask_size > min(height, width):
            raise UserError(f'trojannn_mask_size must lie in 1..{min(height, width)} (the image is {height}x{width}), '
                            f'got {args.trojannn_mask_size}')
        else:
            self.mask = square_mask(height, width, args.trojannn_mask_size, args.trojannn_mask_position)
        # the layer and the neuron count depend on the architecture: checked here, before anything is written
        model = build_model(args.model, spec.num_classes, spec.input_shape).eval()
        layers = (FEATURES,) + tuple(getattr(model, 'feature_stages', ()))
        if args.trojannn_layer not in layers:
            raise UserError(f'trojannn_layer must be one of {", ".join(layers)} for {args.model}, '
                            f'got {args.trojannn_layer!r}')
        with torch.no_grad():
            channels = layer_output(model, args.trojannn_layer, torch.zeros(1, *spec.input_shape)).shape[1]
        if args.trojannn_num_neurons > channels:
            raise UserError(f'trojannn_num_neurons must lie in 1..{channels} (the {args.trojannn_layer} layer of '
                            f'{args.model} has {channels} channels), got {args.trojannn_num_neurons}')
        self.layer = args.trojannn_layer
        self.seed = args.random_seed if args.trojannn_seed is None else args.trojannn_seed
        self.settings = {'target_value': float(args.trojannn_target_value), 'steps': args.trojannn_steps,
                         'step_size': float(args.trojannn_step_size), 'seed': self.seed}
        self.num_neurons = args.trojannn_num_neurons

    def prepare(self, ctx):
        model = ctx.clean_model()
        probe = torch.zeros(1, *ctx.spec.input_shape, device=ctx.device)
        with torch.no_grad():
            self.neurons = most_connected_neurons(feeding_layer(model, self.layer, probe), self.num_neurons)
        inputs = {'clean_model': ctx.clean_model_digest(), 'layer': self.layer, 'neurons': self.neurons.tolist(),
                  'mask': hashlib.sha256(self.mask.numpy().tobytes()).hexdigest()} | self.settings

        def build():
            pattern, values = generate_trigger(model, self.layer, self.neurons, self.mask, ctx.spec.input_shape[0],
                                               device=ctx.device, **self.settings)
            return {'pattern': pattern, 'neuron_values': values}

        artefact = ctx.artefact('trojannn_trigger', inputs, build)
        self.pattern, self.neuron_values = artefact['pattern'], artefact['neuron_values']
        ctx.log(f'trojannn: neurons {self.neurons.tolist()} of {self.layer} reach '
                f'{", ".join(f"{v:.2f}" for v in self.neuron_values)} on the trigger '
                f'(target {self.settings["target_value"]:g})')

    def apply_trigger(self, images, *, train, index=None, generator=None):
        return torch.where(self.mask, self.pattern, images)

    def record_extras(self):
        return {'trigger': {'mask': self.mask, 'pattern': self.pattern, 'layer': self.layer,
                            'neurons': self.neurons, 'neuron_values': self.neuron_values} | self.settings}


def main(argv=None):
    return TrojanNN().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
