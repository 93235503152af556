"""The vision graph: the image's patches to the soft tokens the encoder reads in place of its image tokens, one
function per transformers module (Gemma4Vision*, DiffusionGemmaMultimodalEmbedder), written like builder.py's.

    patch_embedder: 2 (x - 0.5) @ input_proj + the x and y rows of the position table
    encoder: layers of bidirectional attention (q/k norms, axial 2-D rotary, scale 1, a scale-free v norm) and a
             gated GELU-tanh MLP, four RMSNorms each; no final norm
    pooler: the mean of each pooling_kernel x pooling_kernel block of patches, times sqrt(hidden)
    [standardize: (x - std_bias) * std_scale]
    embed_vision: a scale-free RMSNorm, then a projection to the text's hidden size

The graph takes one image's patches at a time (runtime/images.py: rows of patches, no padding), or several images
of the same patch grid; the pooled grid follows from the positions.
"""

import numpy as np
from onnx import TensorProto

from .builder import Graph, apply_rotary, rms_norm

TOWER = "model.encoder.vision_tower"
EMBEDDER = "model.encoder.embed_vision"


class VisionShape:
    """What the vision functions need from the config."""

    def __init__(self, config):
        from dg_runtime.errors import UserError

        vision = config.vision_config
        if vision is None:
            raise UserError("this checkpoint has no vision tower (its config has no vision_config)")
        if vision.use_clipped_linears:
            raise UserError("this vision tower clips its linear layers' inputs and outputs, which dg-export does not "
                            "support yet")
        self.vision, self.text_hidden = vision, config.text_config.hidden_size
        self.hidden, self.heads, self.kv_heads = vision.hidden_size, vision.num_attention_heads, vision.num_key_value_heads
        self.head_dim, self.eps, self.layers = vision.head_dim, vision.rms_norm_eps, vision.num_hidden_layers
        self.patch_size, self.kernel, self.standardize = vision.patch_size, vision.pooling_kernel_size, vision.standardize
        self.inv_freq = axial_frequencies(vision)


def axial_frequencies(vision_config) -> np.ndarray:
    """inv_freq of transformers' own axial rotary module: head_dim / 4 frequencies, shared by x and y."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4VisionRotaryEmbedding

    return Gemma4VisionRotaryEmbedding(vision_config).inv_freq.numpy()


def vision_specs(config) -> dict:
    """The vision graph's inputs and output (runtime/images.py makes the inputs)."""
    vision = config.vision_config
    return {
        "inputs": [
            {"name": "pixel_values", "dtype": "float32", "shape": ["images", "patches", 3 * vision.patch_size ** 2]},
            {"name": "pixel_positions", "dtype": "int64", "shape": ["images", "patches", 2]},
        ],
        "outputs": [
            {"name": "image_features", "dtype": "float32",
             "shape": ["images", "image_tokens", config.text_config.hidden_size]},
        ],
    }


def patch_embedder(g: Graph, pixels: str, positions: str, v: VisionShape) -> str:
    """Gemma4VisionPatchEmbedder: the patches projected, plus the position table's x row and y row."""
    prefix = f"{TOWER}.patch_embedder"
    with g.scope("patch_embedder"):
        centred = g.op("Mul", g.op("Sub", pixels, g.const(0.5, np.float32)), g.const(2.0, np.float32))
        projected = g.linear(centred, f"{prefix}.input_proj.weight")
        table = g.weight(f"{prefix}.position_embedding_table")
        x, y = (g.op("Gather", positions, g.const(axis), axis=-1) for axis in (0, 1))
        along = [g.op("Gather", g.op("Gather", table, g.const(axis), axis=0), index, axis=0)
                 for axis, index in ((0, x), (1, y))]
        return g.op("Add", projected, g.op("Add", *along))


def rotary_emb(g: Graph, positions: str, v: VisionShape) -> list[tuple[str, str]]:
    """Gemma4VisionRotaryEmbedding: (cos, sin) [images, patches, 1, head_dim / 2] for the x half and the y half."""
    with g.scope("rotary_emb"):
        angles = []
        for axis in (0, 1):
            coordinate = g.op("Cast", g.op("Gather", positions, g.const(axis), axis=-1), to=TensorProto.FLOAT)
            freqs = g.op("Mul", g.op("Unsqueeze", coordinate, g.const([-1])), g.const(v.inv_freq, np.float32))
            emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([2]))
            angles.append((g.op("Cos", emb), g.op("Sin", emb)))
        return angles


def apply_axial_rotary(g: Graph, x: str, rope: list[tuple[str, str]], head_dim: int) -> str:
    """apply_multidimensional_rope: the first half of each head turns with x, the second with y."""
    halves = g.op("Split", x, g.const([head_dim // 2, head_dim // 2]), axis=-1, outputs=2)
    return g.op("Concat", *(apply_rotary(g, half, cos, sin, head_dim // 2) for half, (cos, sin) in zip(halves, rope)),
                axis=-1)


def self_attn(g: Graph, x: str, prefix: str, rope, v: VisionShape) -> str:
    """Gemma4VisionAttention: every patch sees every patch of its image; scaling 1 (the q/k norms scale)."""
    groups = v.heads // v.kv_heads
    with g.scope("self_attn"):
        def heads(name: str, count: int) -> str:
            return g.op("Reshape", g.linear(x, f"{prefix}.{name}.linear.weight"), g.const([0, 0, count, v.head_dim]))

        query = apply_axial_rotary(g, rms_norm(g, heads("q_proj", v.heads), f"{prefix}.q_norm.weight", v.eps), rope,
                                   v.head_dim)
        key = apply_axial_rotary(g, rms_norm(g, heads("k_proj", v.kv_heads), f"{prefix}.k_norm.weight", v.eps), rope,
                                 v.head_dim)
        value = rms_norm(g, heads("v_proj", v.kv_heads), None, v.eps)
        # [images, kv_heads, groups, patches, head_dim] queries against [images, kv_heads, 1, patches, head_dim]
        query = g.op("Reshape", g.op("Transpose", query, perm=[0, 2, 1, 3]), g.const([0, v.kv_heads, groups, -1, v.head_dim]))
        key, value = (g.op("Unsqueeze", g.op("Transpose", t, perm=[0, 2, 1, 3]), g.const([2])) for t in (key, value))
        scores = g.op("MatMul", query, g.op("Transpose", key, perm=[0, 1, 2, 4, 3]))
        attended = g.op("MatMul", g.op("Softmax", scores, axis=-1), value)
        attended = g.op("Reshape", attended, g.const([0, v.heads, -1, v.head_dim]))
        attended = g.op("Reshape", g.op("Transpose", attended, perm=[0, 2, 1, 3]), g.const([0, 0, v.heads * v.head_dim]))
        return g.linear(attended, f"{prefix}.o_proj.linear.weight")


def mlp(g: Graph, x: str, prefix: str) -> str:
    """Gemma4VisionMLP: down(gelu_tanh(gate(x)) * up(x))."""
    with g.scope("mlp"):
        gate = g.op("Gelu", g.linear(x, f"{prefix}.gate_proj.linear.weight"), approximate="tanh")
        return g.linear(g.op("Mul", gate, g.linear(x, f"{prefix}.up_proj.linear.weight")), f"{prefix}.down_proj.linear.weight")


def encoder_layer(g: Graph, x: str, i: int, rope, v: VisionShape) -> str:
    """Gemma4VisionEncoderLayer."""
    prefix = f"{TOWER}.encoder.layers.{i}"
    with g.scope(f"encoder.layers.{i}"):
        attended = self_attn(g, rms_norm(g, x, f"{prefix}.input_layernorm.weight", v.eps), f"{prefix}.self_attn", rope, v)
        x = g.op("Add", x, rms_norm(g, attended, f"{prefix}.post_attention_layernorm.weight", v.eps))
        fed = mlp(g, rms_norm(g, x, f"{prefix}.pre_feedforward_layernorm.weight", v.eps), f"{prefix}.mlp")
        return g.op("Add", x, rms_norm(g, fed, f"{prefix}.post_feedforward_layernorm.weight", v.eps))


def pooler(g: Graph, x: str, positions: str, v: VisionShape) -> str:
    """Gemma4VisionPooler: each kernel x kernel block of the patch grid averaged (rows of blocks, then columns),
    times sqrt(hidden). The grid's width is the largest x + 1; patches come a row of the grid after another."""
    k = v.kernel
    with g.scope("pooler"):
        columns = g.op("Add", g.op("ReduceMax", g.op("Gather", positions, g.const(0), axis=-1), keepdims=0), g.const(1))
        blocks_across = g.op("Unsqueeze", g.op("Div", columns, g.const(k)), g.const([0]))
        grid = g.op("Concat", g.const([0, -1, k]), blocks_across, g.const([k, v.hidden]), axis=0)
        pooled = g.op("ReduceMean", g.op("Reshape", x, grid), g.const([2, 4]), keepdims=0)
        flat = g.op("Reshape", pooled, g.const([0, -1, v.hidden]))
        return g.op("Mul", flat, g.const(v.hidden ** 0.5, np.float32))


def embed_vision(g: Graph, x: str, v: VisionShape) -> str:
    """DiffusionGemmaMultimodalEmbedder: a scale-free RMSNorm, then the projection to the text's hidden size."""
    with g.scope("embed_vision"):
        return g.linear(rms_norm(g, x, None, v.eps), f"{EMBEDDER}.embedding_projection.weight")


def build_vision_model(config, weights, target: str = "onnx") -> "onnx.ModelProto":
    """The vision graph (vision_specs): Gemma4VisionModel and the embedder."""
    v, spec = VisionShape(config), vision_specs(config)
    g = Graph("vision", weights, target)
    pixels, positions = (g.add_input(e) for e in spec["inputs"])
    x = patch_embedder(g, pixels, positions, v)
    rope = rotary_emb(g, positions, v)
    for i in range(v.layers):
        x = encoder_layer(g, x, i, rope, v)
    x = pooler(g, x, positions, v)
    if v.standardize:
        x = g.op("Mul", g.op("Sub", x, g.weight(f"{TOWER}.std_bias")), g.weight(f"{TOWER}.std_scale"))
    g.add_output(embed_vision(g, x, v), spec["outputs"][0])
    return g.model()
