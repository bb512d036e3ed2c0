"""BadNets (Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply
Chain", 2017): a small patch stamped onto the image. Default: a 3x3 white square in the bottom-right
corner, as BackdoorBench uses for CIFAR-10; ``patch_mask_path`` stamps an image's non-black pixels instead."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702

import torch

from utils import UserError
from utils.attack import Attack, register_attack
from utils.config import path_arg, pixel_value, positive_int, run_main
from utils.triggers import load_trigger_image

CORNERS = ('bottom_right', 'bottom_left', 'top_right', 'top_left')


@register_attack
class BadNet(Attack):
    """BadNets: stamp a patch (default 3x3 white, bottom-right corner) and relabel to the target."""
    name = 'badnet'

    def add_arguments(self, parser):
        parser.add_argument('--patch_size', type=positive_int, default=3, help='side of the square patch, in pixels')
        parser.add_argument('--patch_position', default='bottom_right', choices=CORNERS)
        parser.add_argument('--patch_value', type=pixel_value, default=255, help='pixel value of the patch (0..255)')
        parser.add_argument('--patch_mask_path', default=None, type=path_arg,
                            help='trigger image (resized to the input size): its non-black pixels replace the image\'s')

    def setup(self, args, spec):
        channels, height, width = spec.input_shape
        if args.patch_mask_path:
            pattern = load_trigger_image(args.patch_mask_path, spec.input_shape)
            self.mask = (pattern > 0).any(0, keepdim=True)
            self.pattern = pattern
            return
        if args.patch_size > min(height, width):
            raise UserError(f'patch_size must lie in 1..{min(height, width)} (the image is {height}x{width}), got {args.patch_size}')
        size = args.patch_size
        top = height - size if args.patch_position.startswith('bottom') else 0
        left = width - size if args.patch_position.endswith('right') else 0
        self.mask = torch.zeros(1, height, width, dtype=torch.bool)
        self.mask[:, top:top + size, left:left + size] = True
        self.pattern = torch.full((channels, height, width), args.patch_value, dtype=torch.uint8)

    def apply_trigger(self, images, *, train, index=None, generator=None):
        return torch.where(self.mask, self.pattern, images)

    def record_extras(self):
        return {'trigger': {'mask': self.mask, 'pattern': self.pattern}}



def main(argv=None):
    return BadNet().run(__file__, argv)


if __name__ == '__main__':
    sys.exit(run_main(main))
