"""Images for the vision tower, torch-free: decoded with Pillow (the `[image]` extra; the rest of the runtime does
not need it) and cut into patches exactly as transformers' Gemma 4 image processor (its PIL backend) does.

    decode (first frame of an animation) -> RGB, transparency composited onto white
    -> resize, aspect ratio kept, to the largest multiple of pooling_kernel x patch pixels a side whose patches fit
       max_soft_tokens x pooling_kernel^2 (PIL bicubic on the 8-bit image; small images are enlarged too)
    -> x / 255 -> patches of patch x patch x 3 values (rows of patches, then columns; channels fastest)
       with their (column, row) in the patch grid; one soft token per pooling_kernel^2 patches

What is refused, with one line: a file that is not an image, a truncated one, one of more than MAX_PIXELS pixels
(a decompression bomb: the processor needs at most a few million), and 16- or 32-bit samples (modes I;16, I, F:
Pillow's conversion to RGB would clip them). CMYK, palette, grey and YCbCr images are converted to RGB by Pillow.
"""

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

MAX_PIXELS = 64 << 20  # 8192 x 8192
WIDE_SAMPLES = ("I", "F")  # and every "I;16..." mode


class ImageError(UserError):
    """An image that cannot be used: `source` names it."""

    def __init__(self, message: str, source: str):
        super().__init__(message)
        self.source = source


@dataclass(frozen=True)
class ImageSpec:
    """The vision tower's preprocessing sizes (the artifact records them)."""

    patch_size: int = 16
    pooling_kernel: int = 3
    max_soft_tokens: int = 280

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel ** 2


def open_image(source, name: str | None = None):
    """A decoded PIL image from a path, bytes or a PIL image; ImageError says what is wrong with it."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UserError("images need Pillow: pip install 'dg-edge[image]'") from None
    if isinstance(source, Image.Image):
        return checked(source, name or "the image")
    name = name or (str(source) if isinstance(source, (str, Path)) else "the image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS decides, below
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            checked(image, name)
            image.load()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file", name) from None
    except IsADirectoryError:
        raise ImageError(f"{name} is a folder, not an image file", name) from None
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageError(f"{name} has more pixels than the {MAX_PIXELS >> 20} M this runtime opens (the model sees at "
                             "most a few million): resize it first", name) from None
        raise ImageError(f"{name} is not an image Pillow can read (PNG, JPEG, WebP, GIF, BMP, ...)", name) from None
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's decoders: truncated or corrupted data
        raise ImageError(f"{name} is truncated or corrupted ({exc}); give the whole file", name) from None
    return image


def checked(image, name: str):
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name} is {width} x {height} pixels, more than the {MAX_PIXELS >> 20} M this runtime "
                         f"opens (the model sees at most a few million): resize it first", name)
    if width == 0 or height == 0:
        raise ImageError(f"{name} has no pixels ({width} x {height})", name)
    if image.mode in WIDE_SAMPLES or image.mode.startswith("I;16"):
        raise ImageError(f"{name} has {image.mode} samples (16 or 32 bits); the model reads 8-bit images: save it as "
                         "8-bit RGB or greyscale", name)
    return image


def to_rgb(image):
    """RGB, transparency (an alpha band or a transparent palette entry) composited onto white."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def target_size(height: int, width: int, spec: ImageSpec) -> tuple[int, int]:
    """The resized (height, width): multiples of pooling_kernel x patch_size with at most max_patches patches."""
    side = spec.pooling_kernel * spec.patch_size
    budget = spec.max_patches * spec.patch_size ** 2
    factor = math.sqrt(budget / (height * width))
    target_height = math.floor(factor * height / side) * side
    target_width = math.floor(factor * width / side) * side
    longest = spec.max_soft_tokens * side  # a one-token-high strip
    if target_height == 0:
        target_height, target_width = side, min(width // height * side, longest)
    elif target_width == 0:
        target_width, target_height = side, min(height // width * side, longest)
    return target_height, target_width


def patches(image, spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """An image's patches ([P, patch^2 * 3] float32 in [0, 1]) and their (column, row) positions ([P, 2] int64);
    P is a multiple of pooling_kernel^2 (no padding: `pad` adds it)."""
    from PIL import Image

    rgb = to_rgb(image)
    height, width = target_size(rgb.height, rgb.width, spec)
    if (height, width) != (rgb.height, rgb.width):
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
    pixels = (np.asarray(rgb, dtype=np.float64) * (1 / 255)).astype(np.float32)
    p = spec.patch_size
    rows, columns = height // p, width // p
    values = pixels.reshape(rows, p, columns, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * columns, p * p * 3)
    column, row = np.meshgrid(np.arange(columns), np.arange(rows), indexing="xy")
    return values, np.stack([column.ravel(), row.ravel()], axis=1).astype(np.int64)


def pad(values: np.ndarray, positions: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Patches padded to `length` rows: zero pixels at position (-1, -1), which the vision tower ignores."""
    extra = length - len(values)
    return (np.pad(values, ((0, extra), (0, 0))),
            np.pad(positions, ((0, extra), (0, 0)), constant_values=-1))
