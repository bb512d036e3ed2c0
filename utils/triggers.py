"""Helpers shared by triggers."""
from __future__ import annotations

import torch

from . import UserError


def load_trigger_image(path: str, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """An image file as uint8 (C, H, W), resized (nearest) to ``input_shape``."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor
    channels, height, width = input_shape
    try:
        with Image.open(path) as image:
            image = image.convert('RGB' if channels == 3 else 'L').resize((width, height), Image.NEAREST)
            return pil_to_tensor(image)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserError(f'cannot read trigger image {path}: {exc}') from None
