"""Weight-only quantization of one matrix at a time, in the byte layouts the backends' kernels read.

int8: symmetric, one scale per output channel, stored [in, out] int8 (ONNX Runtime's DynamicQuantizeMatMul and
OpenVINO's compressed FullyConnected read it as it is; their int8 kernels quantize the activations on the fly).
int4: one fp16 scale per group of `group` input channels, values stored [out, in / group, group / 2] with two a
byte, low nibble first (ONNX Runtime's MatMulNBits layout); symmetric values sit around 8 with no stored zero
point, asymmetric ones carry an fp16 zero point per group. fp16 scales keep the 26B's int4 artifact 0.5 GB smaller
than fp32 ones would (both backends read them: MatMulNBits on fp16 activations, OpenVINO as NNCF writes them).

Every function takes the checkpoint's [out, in] rows, so a tensor can be quantized a chunk of rows at a time.
"""

from dataclasses import dataclass

import numpy as np

FLOAT_FORMATS = ("fp32", "fp16")
FORMATS = (*FLOAT_FORMATS, "int8", "int4")
MIN_GROUP = 16  # MatMulNBits' smallest block


@dataclass(frozen=True)
class Scheme:
    """How one tensor is stored: format, and for int4 the group size and symmetry."""

    format: str = "fp32"
    group: int | None = None
    sym: bool = True
    channelwise: bool = False  # int4 with one group spanning each row (`group` is then the row's width)

    @property
    def quantized(self) -> bool:
        return self.format not in FLOAT_FORMATS

    def record(self) -> dict:
        entry = {"format": self.format}
        if self.format == "int8":
            entry.update(group_size=-1, sym=True)
        elif self.format == "int4":
            entry.update(group_size=-1 if self.channelwise else self.group, sym=self.sym)
        return entry

    def for_columns(self, columns: int) -> "Scheme":
        """This scheme with the group narrowed to divide `columns` (the expert width 704 takes 64, not 128); int8,
        the backup precision, where no group of at least MIN_GROUP does (as NNCF keeps such a tensor). Group -1:
        one group a row (per channel)."""
        if self.format == "int4" and self.group == -1:
            return Scheme("int4", columns, self.sym, channelwise=True)
        if self.format != "int4" or columns % self.group == 0:
            return self
        group = self.group
        while group > MIN_GROUP and columns % group:
            group //= 2
        return Scheme("int8") if columns % group else Scheme("int4", group, self.sym)


def int8_channels(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] floats -> (int8 [out, in], scale [out]); value = q * scale."""
    scale = np.abs(rows).max(axis=-1) / 127
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(rows / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def int4_groups(rows: np.ndarray, group: int, sym: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """[out, in] floats -> (packed uint8 [out, in/group, group/2], fp16 scale [out, in/group], zero point or None).

    Symmetric: q = round(w / scale) + 8 in 1..15, scale = max|w| / 7. Asymmetric: q = round(w / scale) + zero in
    0..15, scale = (max - min) / 15, zero an fp16 whole number per group (MatMulNBits reads a float zero point).
    """
    out, columns = rows.shape
    blocks = rows.reshape(out, columns // group, group)
    if sym:
        scale = fp16_scale(np.abs(blocks).max(axis=-1) / 7)
        zero = None
        q = np.clip(np.rint(blocks / scale[..., None].astype(np.float32)), -7, 7) + 8
    else:
        low, high = np.minimum(blocks.min(axis=-1), 0), np.maximum(blocks.max(axis=-1), 0)
        scale = fp16_scale((high - low) / 15)
        wide = scale.astype(np.float32)
        zero = np.clip(np.rint(-low / wide), 0, 15).astype(np.float16)
        q = np.clip(np.rint(blocks / wide[..., None]) + zero[..., None], 0, 15)
    q = q.astype(np.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, scale, zero


def fp16_scale(scale: np.ndarray) -> np.ndarray:
    """Scales rounded up to fp16, so that the group's range still fits in 16 levels (values are quantized with
    the rounded scale: every value is within half a step); a group of zeros gets scale 1."""
    half = scale.astype(np.float16)
    low = half.astype(np.float32) < scale
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    half[half == 0] = 1.0
    return half


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 [..., out, in] (as the checkpoint orders it) -> float64 (exact: the check must not round)."""
    return q.astype(np.float64) * scale[..., None]


def dequantize_int4(packed: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    """The inverse of int4_groups: [out, in/group, group/2] -> [out, in] float64 (exact)."""
    q = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.float64)
    q[..., 0::2], q[..., 1::2] = packed & 15, packed >> 4
    values = (q - (8 if zero is None else zero[..., None].astype(np.float64))) * scale[..., None].astype(np.float64)
    return values.reshape(packed.shape[0], -1)
