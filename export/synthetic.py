"""Deterministic random checkpoints of any DiffusionGemma shape: streamed by the exporter as they are generated
(`dg-export synthetic:CONFIG_FOLDER`), or written to safetensors shards.

Stand-ins for checkpoints we cannot download: the tensors have a real checkpoint's names, shapes and dtype and
are initialised much as transformers initialises the model, so activations stay finite and well-conditioned
through every layer. Each row of each tensor depends only on the seed, the tensor's name and the row, so any
chunk can be generated alone, and a multi-GB checkpoint needs one chunk's memory.
"""

import json
import struct
import zlib
from pathlib import Path

import numpy as np

from .builtin import GENERATION_CONFIG, TINY_VISION_CONFIG, write_tokenizer
from .checkpoint import bf16_to_fp32, row_chunks

SAFETENSORS_DTYPES = {"bf16": ("BF16", 2), "fp16": ("F16", 2), "fp32": ("F32", 4)}
ONES = ("norm.weight", "layernorm.weight", "layernorm_1.weight", "layernorm_2.weight", "router.scale",
        "per_expert_scale", "layer_scalar")


def fp32_to_bf16(array: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch's conversion does."""
    bits = array.astype(np.float32, copy=False).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def text_tensor_shapes(config, images: bool = False) -> dict[str, tuple]:
    """The tensors a transformers checkpoint of `config` stores for the text path (tied ones once), and with
    `images` for the vision tower."""
    from .weights import expected_shapes

    shapes = expected_shapes(config, images)
    stored = {}
    for name, shape in shapes.items():
        if name.startswith("model.encoder.language_model.") and not name.endswith("layer_scalar"):
            continue  # tied to the decoder's tensors; transformers saves those
        stored[name] = shape
    return stored


class SyntheticCheckpoint:
    """A checkpoint that is not on disk: the tensors `write_checkpoint` writes, generated a chunk of rows at a time
    (each row seeded by the seed, the tensor's name and its index) and rounded to the checkpoint's dtype. It has
    `Checkpoint`'s interface, so the exporter streams it exactly as it streams a real one.

    Values follow transformers' init but for the two places where a random network is chaotic rather than merely
    random:
    - q_norm/k_norm scale by head_dim^-0.25 each: DiffusionGemma's attention has no 1/sqrt(head_dim) (the norms'
      learned scales take that role), so unit norms make every softmax nearly one-hot, and float rounding then grows
      about 2.5x per layer (transformers itself in fp32 and fp64 disagreed by 2e-4 after six layers);
    - router.proj with unit std: near-uniform routing puts top-k ties everywhere, and a tie broken differently by
      rounding sends a token to another expert.
    `embedding_std` sets the tied embedding's scale (a larger one gives peaked output distributions).
    """

    def __init__(self, config, dtype: str = "bf16", seed: int = 0, embedding_std: float | None = None,
                 images: bool = False):
        self.shapes, self.dtype, self.seed = text_tensor_shapes(config, images), dtype, seed
        self.std, self.embedding_std = config.text_config.initializer_range, embedding_std

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def names(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.shapes[name])

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shapes[name])) * SAFETENSORS_DTYPES[self.dtype][1]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        from dg_runtime.errors import UserError

        if name not in self.shapes:
            raise UserError(f"the checkpoint has no tensor {name!r}: it does not match its config.json")
        shape = self.shapes[name]
        stop = shape[0] if stop is None else stop
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            values = np.full((stop - start, *shape[1:]), shape[-1] ** -0.25, dtype=np.float32)
        elif name.endswith(ONES):
            values = np.ones((stop - start, *shape[1:]), dtype=np.float32)
        else:
            scale = self.std
            if self.embedding_std is not None and name.endswith("embed_tokens.weight"):
                scale = self.embedding_std
            elif name.endswith("router.proj.weight"):
                scale = 1.0
            key = zlib.crc32(name.encode())
            if len(shape) == 1:
                values = np.random.default_rng([self.seed, key]).standard_normal(shape, dtype=np.float32)[start:stop]
            else:
                values = np.stack([np.random.default_rng([self.seed, key, row]).standard_normal(shape[1:], dtype=np.float32)
                                   for row in range(start, stop)])
            values *= np.float32(scale)
        if self.dtype == "bf16":
            return bf16_to_fp32(fp32_to_bf16(values))
        return values.astype(np.float16).astype(np.float32) if self.dtype == "fp16" else values


def write_checkpoint(folder: Path, config, dtype: str = "bf16", shard_bytes: int = 2 << 30, seed: int = 0,
                     embedding_std: float | None = None, progress=None, images: bool = False) -> Path:
    """config.json, generation_config.json, a byte-level tokenizer and sharded safetensors (+ index) in `folder`,
    holding exactly the tensors of SyntheticCheckpoint(config, dtype, seed, embedding_std, images)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = SyntheticCheckpoint(config, dtype, seed, embedding_std, images)
    st_dtype, itemsize = SAFETENSORS_DTYPES[dtype]
    shards, current, size = [], [], 0
    for name in source.names():
        if current and size + source.nbytes(name) > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += source.nbytes(name)
    shards.append(current)

    weight_map = {}
    for index, names in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            header[name] = {"dtype": st_dtype, "shape": list(source.shape(name)),
                            "data_offsets": [offset, offset + source.nbytes(name)]}
            offset += source.nbytes(name)
            weight_map[name] = file
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(folder / file, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            for name in names:
                for start, stop in row_chunks(source.shape(name)):
                    array = source.read(name, start, stop)
                    data = fp32_to_bf16(array) if dtype == "bf16" else array.astype(np.float16 if dtype == "fp16" else np.float32)
                    handle.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                    if progress is not None:
                        progress.update(data.nbytes)
    total = sum(source.nbytes(name) for name in source.names())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    write_config(folder, config, dtype)
    write_tokenizer(folder)
    return folder


def write_config(folder: Path, config, dtype: str = "bf16") -> None:
    """config.json and generation_config.json: a checkpoint folder's shape, all `synthetic:FOLDER` needs."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    raw = config.to_dict()
    raw["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    eos = config.text_config.eos_token_id
    (folder / "generation_config.json").write_text(json.dumps({**GENERATION_CONFIG, "eos_token_id": eos}, indent=2))


def standin_config(published_config: Path, text_overrides: dict | None = None):
    """A text-only DiffusionGemmaConfig of a published config.json's shape, with `text_overrides` (narrower widths)."""
    from transformers import DiffusionGemmaConfig

    published = json.loads(Path(published_config).read_text())
    text = {k: v for k, v in published["text_config"].items() if k != "model_type"}
    return DiffusionGemmaConfig(text_config={**text, **(text_overrides or {})}, vision_config=TINY_VISION_CONFIG,
                                canvas_length=published.get("canvas_length", 256),
                                tie_word_embeddings=published.get("tie_word_embeddings", True))
