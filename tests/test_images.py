"""Image preprocessing without torch (runtime/images.py): the pixels and patch positions of transformers' Gemma 4
image processor (PIL backend), bit for bit, over sizes, aspect ratios and modes; and the images it refuses."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from dg_runtime.images import ImageError, ImageSpec, open_image, pad, patches

SIZES = [(50, 37), (480, 640), (1080, 1920), (224, 224), (3, 900), (900, 2), (1, 1)]
MODES = ["RGB", "RGBA", "LA", "L", "P", "CMYK"]


def random_image(height: int, width: int, mode: str, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    if mode == "P":
        image.info["transparency"] = 3  # a transparent palette entry: composited onto white
    return image


def assert_as_transformers(image: Image.Image, spec: ImageSpec) -> None:
    processor = Gemma4ImageProcessorPil(patch_size=spec.patch_size, pooling_kernel_size=spec.pooling_kernel,
                                        max_soft_tokens=spec.max_soft_tokens)
    expected = processor(images=[image], return_tensors="np")
    values, positions = patches(image, spec)
    assert len(values) // spec.pooling_kernel ** 2 == expected["num_soft_tokens_per_image"][0]
    padded_values, padded_positions = pad(values, positions, spec.max_patches)
    assert np.array_equal(padded_values, expected["pixel_values"][0])
    assert np.array_equal(padded_positions, expected["image_position_ids"][0])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("spec", [ImageSpec(16, 3, 280), ImageSpec(4, 3, 70)], ids=["published", "small"])
def test_patches_equal_transformers(size, spec):
    for seed, mode in enumerate(MODES):
        assert_as_transformers(random_image(*size, mode, seed), spec)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_files_decode_as_pillow_opens_them(tmp_path):
    jpeg = tmp_path / "photo.jpg"
    jpeg.write_bytes(encoded(random_image(120, 90, "RGB", 1), "JPEG"))
    assert_as_transformers(open_image(jpeg), ImageSpec(16, 3, 70))
    frames = [random_image(40, 60, "RGB", seed).convert("P") for seed in range(3)]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    animation = open_image(gif)
    assert animation.n_frames == 3 and animation.tell() == 0  # the first frame is the image
    assert_as_transformers(animation, ImageSpec(4, 3, 70))


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header says width x height (a decompression bomb as far as the header goes)."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


BAD = {
    "not an image": (b"hello, this is text", "is not an image Pillow can read"),
    "truncated": (encoded(random_image(64, 64, "RGB", 2), "PNG")[:400], "is truncated or corrupted"),
    "bomb": (png_claiming(100_000, 100_000), "more pixels than the 64 M"),  # Pillow's own limit first
    "large": (png_claiming(9000, 9000), "is 9000 x 9000 pixels, more than the 64 M"),
    "16-bit": (encoded(Image.new("I;16", (8, 8)), "PNG"), "I;16 samples"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_images_are_refused_in_one_line(case):
    data, message = BAD[case]
    with pytest.raises(ImageError, match=message) as refused:
        open_image(data, "upload.png")
    assert "\n" not in str(refused.value) and str(refused.value).startswith("upload.png")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "missing.png")
