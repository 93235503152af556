"""Deterministic random checkpoints of any DiffusionGemma shape, written tensor by tensor.

Stand-ins for checkpoints we cannot download: the tensors have a real checkpoint's names, shapes and dtype and
are initialised the way transformers initialises the model (normal(0, initializer_range) matrices, unit norms and
scales), so activations stay finite through every layer. Each tensor depends only on the seed and its name, and
shards are written one tensor at a time, so a multi-GB checkpoint needs one tensor's memory to write.
"""

import json
import struct
import zlib
from pathlib import Path

import numpy as np

from .builtin import GENERATION_CONFIG, TINY_VISION_CONFIG, write_tokenizer

SAFETENSORS_DTYPES = {"bf16": ("BF16", 2), "fp16": ("F16", 2), "fp32": ("F32", 4)}
ONES = ("norm.weight", "layernorm.weight", "router.scale", "per_expert_scale", "layer_scalar")


def fp32_to_bf16(array: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch's conversion does."""
    bits = array.astype(np.float32, copy=False).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def text_tensor_shapes(config) -> dict[str, tuple]:
    """The tensors a transformers checkpoint of `config` stores for the text path (tied ones once)."""
    from .weights import expected_shapes

    shapes = expected_shapes(config)
    stored = {}
    for name, shape in shapes.items():
        if name.startswith("model.encoder.language_model.") and not name.endswith("layer_scalar"):
            continue  # tied to the decoder's tensors; transformers saves those
        stored[name] = shape
    return stored


def synthetic_tensor(name: str, shape: tuple, seed: int, std: float, embedding_std: float | None) -> np.ndarray:
    """transformers' init, but for the two places where a random network is chaotic rather than merely random:

    - q_norm/k_norm scale by head_dim^-0.25 each: DiffusionGemma's attention has no 1/sqrt(head_dim) (the norms'
      learned scales take that role), so unit norms make every softmax nearly one-hot, and float rounding
      then grows about 2.5x per layer (transformers itself in fp32 and fp64 disagreed by 2e-4 after six layers);
    - router.proj with unit std: near-uniform routing puts top-k ties everywhere, and a tie broken differently
      by rounding sends a token to another expert.
    """
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return np.full(shape, shape[-1] ** -0.25, dtype=np.float32)
    if name.endswith(ONES):
        return np.ones(shape, dtype=np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    scale = std
    if embedding_std is not None and name.endswith("embed_tokens.weight"):
        scale = embedding_std
    elif name.endswith("router.proj.weight"):
        scale = 1.0
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)


def write_checkpoint(folder: Path, config, dtype: str = "bf16", shard_bytes: int = 2 << 30, seed: int = 0,
                     embedding_std: float | None = None, progress=None) -> Path:
    """config.json, generation_config.json, a byte-level tokenizer and sharded safetensors (+ index) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    st_dtype, itemsize = SAFETENSORS_DTYPES[dtype]
    shapes = text_tensor_shapes(config)
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)

    weight_map = {}
    for index, names in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            nbytes = int(np.prod(shapes[name])) * itemsize
            header[name] = {"dtype": st_dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(folder / file, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            for name in names:
                array = synthetic_tensor(name, shapes[name], seed, config.text_config.initializer_range, embedding_std)
                data = fp32_to_bf16(array) if dtype == "bf16" else array.astype(np.float16 if dtype == "fp16" else np.float32)
                handle.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                if progress is not None:
                    progress.update(data.nbytes)
    total = sum(int(np.prod(s)) * itemsize for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    raw = config.to_dict()
    raw["dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    eos = config.text_config.eos_token_id
    (folder / "generation_config.json").write_text(json.dumps({**GENERATION_CONFIG, "eos_token_id": eos}, indent=2))
    write_tokenizer(folder)
    return folder


def standin_config(published_config: Path, text_overrides: dict | None = None):
    """A text-only DiffusionGemmaConfig of a published config.json's shape, with `text_overrides` (narrower widths)."""
    from transformers import DiffusionGemmaConfig

    published = json.loads(Path(published_config).read_text())
    text = {k: v for k, v in published["text_config"].items() if k != "model_type"}
    return DiffusionGemmaConfig(text_config={**text, **(text_overrides or {})}, vision_config=TINY_VISION_CONFIG,
                                canvas_length=published.get("canvas_length", 256),
                                tie_word_embeddings=published.get("tie_word_embeddings", True))
