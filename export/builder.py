"""The model graph (encoder and denoiser in one), built from the config with one function per transformers module.

Nothing is traced: each function below writes the ONNX nodes of the module it is named after
(`DiffusionGemmaTextRouter` -> `router`, ...), and asks `Weights` for the checkpoint tensors it needs, which are
streamed into the shared weights file as the graph is built. The graph protos hold only tensor locations, so
building the 26B shape takes seconds and little memory; graph size grows with layers, not with experts.

Float experts run as a capacity dispatch: every (token, expert) pair gets a slot in an [experts, capacity, hidden]
buffer (capacity = the largest number of tokens any expert received, computed in the graph), both projections are
one batched MatMul over all experts, and each pair's result is gathered back and weighted; its cost is
capacity / mean load times the sparse cost (8-11x with a random router at the 26B's shape). Quantized kernels are
2-D, so quantized experts sort the pairs by expert and give each expert exactly its rows: no padding.
"""

import copy
from contextlib import contextmanager

import numpy as np
import onnx
from onnx import TensorProto, helper

from .graphs import graph_specs, large_head, static_graph_specs

OPSET = 21
FLOAT_MIN = float(np.finfo(np.float32).min)
ONNX_DTYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "bool": TensorProto.BOOL}
CONTRIB = "com.microsoft"  # ONNX Runtime's quantized kernels


def reads_half(g: "Graph", scheme) -> bool:
    """Whether the kernel for `scheme` takes fp16 activations (MatMulNBits with fp16 scales, on ONNX Runtime)."""
    return g.target == "onnx" and scheme.format == "int4"


def quantized_matmul(g: "Graph", x: str, source: str, scheme, index: int | None, half_io: bool = False) -> str:
    """x @ W.T with W stored int8 ([in, out], a scale per output channel) or int4 ([out, in/group, group/2]).

    ONNX Runtime: DynamicQuantizeMatMul (int8 activations x int8 weights: AMX/VNNI) and MatMulNBits (int8 compute,
    accuracy level 4). OpenVINO: the compressed-weight pattern its plugins run without widening the weights
    (Convert -> [Subtract zero point] -> Multiply scale -> MatMul). `half_io`: x is fp16 already and the result
    stays fp16 (the experts cast their dispatch buffer once, not once per expert).
    """
    shape = g.weights.checkpoint.shape(g.weights.resolve(source))
    out, columns = shape[-2], shape[-1]
    if scheme.format == "int8":
        if g.target == "onnx":
            parts = g.stored(source, index=index)
            return g.op("DynamicQuantizeMatMul", x, parts["weight"], parts["scale"], domain=CONTRIB)
        parts = g.stored(source, index=index, scale=(TensorProto.FLOAT, [1, out]))  # 2-D, as OpenVINO's pattern asks
        return g.op("MatMul", x, g.op("Mul", g.op("Cast", parts["weight"], to=TensorProto.FLOAT), parts["scale"]))
    blocks = columns // scheme.group
    half = TensorProto.FLOAT16  # int4 scales (and zero points) are fp16: MatMulNBits then runs on fp16 activations
    if g.target == "onnx":
        parts = g.stored(source, index=index, scale=(half, [out * blocks]),
                         **({"zero": (half, [out * blocks])} if not scheme.sym else {}))
        inputs = [parts["weight"], parts["scale"]] + ([parts["zero"]] if "zero" in parts else [])
        product = g.op("MatMulNBits", x if half_io else g.op("Cast", x, to=half), *inputs, domain=CONTRIB, K=columns,
                       N=out, bits=4, block_size=scheme.group, accuracy_level=4)
        return product if half_io else g.op("Cast", product, to=TensorProto.FLOAT)
    weight = int4_decompressed(g, source, "linear", scheme, [out, columns], f"{source}[{index}]", index=index)
    return g.op("MatMul", x, g.op("Transpose", weight, perm=[1, 0]))


def int4_decompressed(g: "Graph", source: str, layout: str, scheme, dims: list[int], owner: str, **where) -> str:
    """An int4 matrix (or stack of them) of `dims` [..., out, in] in NNCF's decompression form, which OpenVINO keeps
    compressed: Convert(u4) -> Subtract(u4 zero point) -> Multiply(fp16 scale) -> Convert(f32). Groups are
    [..., out, in / group, group] (reshaped back); per channel it is [..., out, in] with a scale a row, as NNCF
    writes it for NPUs. Symmetric weights get a zero point of 8 of their own (one constant shared by thousands
    of weights makes OpenVINO's compile quadratic)."""
    half, lead = TensorProto.FLOAT16, dims[:-1]
    grouped = [*lead, dims[-1] // scheme.group, scheme.group] if not scheme.channelwise else dims
    side = (half, [*grouped[:-1], 1])
    parts = g.stored(source, layout, weight=(TensorProto.UINT4, grouped), scale=side,
                     **({"zero": side} if not scheme.sym else {}), **where)
    zero = parts["zero"] if "zero" in parts else g.op("Cast", g.uint4_eight(owner, len(grouped)), to=half)
    values = g.op("Mul", g.op("Sub", g.op("Cast", parts["weight"], to=half), zero), parts["scale"])
    if not scheme.channelwise:
        values = g.op("Reshape", values, g.const(dims))
    return g.op("Cast", values, to=TensorProto.FLOAT)


class Graph:
    """Nodes, named after the module that owns them, and constants; checkpoint tensors come from `weights`.

    `target` is the backend the graph is for: quantized weights are read by ONNX Runtime's contrib kernels
    ("onnx") or by OpenVINO's compressed-weight pattern in standard ops ("openvino"); float graphs are the same.
    `moe` "tiled" (OpenVINO only) writes the routed experts as the MoE block OpenVINO's transformations fuse.
    """

    def __init__(self, name: str, weights, target: str = "onnx", moe: str = "sorted"):
        self.name, self.weights, self.target, self.moe = name, weights, target, moe
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self.main_nodes = self.nodes
        self._scope, self._count, self._constants, self._weights = [], {}, {}, {}

    @contextmanager
    def loop_body(self, name: str):
        """Nodes made inside go to a Loop body (yielded: its node list and its iteration/condition input names);
        weights, constants and the Casts of narrow weights stay in the main graph, which the body reads by name,
        so that ONNX Runtime packs each weight once."""
        outer, self.nodes = self.nodes, []
        try:
            yield self.nodes, f"{name}/iteration", f"{name}/condition"
        finally:
            self.nodes = outer

    @contextmanager
    def in_main_graph(self):
        """Nodes made inside go to the main graph, also from within a Loop body: ONNX Runtime folds a weight's
        constant expression there and frees the folded copy once it is packed (in a body it keeps it)."""
        current, self.nodes = self.nodes, self.main_nodes
        try:
            yield
        finally:
            self.nodes = current

    @contextmanager
    def scope(self, name: str):
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _name(self, op_type: str) -> str:
        base = "/".join(self._scope + [op_type])
        self._count[base] = self._count.get(base, -1) + 1
        return base if self._count[base] == 0 else f"{base}_{self._count[base]}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs):
        name = self._name(op_type)
        names = [f"{name}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name, domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.int64) -> str:
        """A small constant, stored once per graph."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = f"const_{len(self._constants)}"
            self.initializers.append(onnx.numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]

    def uint4_eight(self, owner: str, rank: int = 3) -> str:
        """A [1, ...] uint4 eight, `owner`'s own: the zero point of symmetric int4 in OpenVINO's pattern."""
        key = ("uint4-eight", owner)
        if key not in self._constants:
            name = f"const_{len(self._constants)}"
            self.initializers.append(helper.make_tensor(name, TensorProto.UINT4, [1] * rank, [8]))
            self._constants[key] = name
        return self._constants[key]

    def weight(self, source: str, layout: str = "as_is", rows: tuple[int, int] | None = None) -> str:
        """A checkpoint tensor; layout 'linear' stores an [out, in] matrix as [in, out] (last two axes); `rows`
        takes a range of the first axis (validation checks samples of experts and of the vocabulary)."""
        key = (source, layout, rows)
        if key not in self._weights:
            tensor = self.weights.tensor(source, layout, rows)
            self.initializers.append(tensor)
            name = tensor.name
            if tensor.data_type != TensorProto.FLOAT:  # stored narrower than it is computed
                with self.in_main_graph():
                    name = self.op("Cast", name, to=TensorProto.FLOAT)
            self._weights[key] = name
        return self._weights[key]

    def stored(self, source: str, layout: str = "linear", rows=None, index=None, **views) -> dict[str, str]:
        """The stored parts of a quantized tensor as initializers; `views` re-declares a part's type and dims over
        the same bytes ({"weight": (TensorProto.UINT4, dims)}: OpenVINO reads packed int4 as u4)."""
        names = {}
        for part, tensor in self.weights.parts(source, layout, rows, index).items():
            if part in views:
                tensor.data_type, dims = views[part]
                del tensor.dims[:]
                tensor.dims.extend(dims)
                tensor.name += f".{TensorProto.DataType.Name(tensor.data_type).lower()}[{'x'.join(map(str, dims))}]"
            if tensor.name not in self._weights:
                self.initializers.append(tensor)
                self._weights[tensor.name] = tensor.name
            names[part] = tensor.name
        return names

    def linear(self, x: str, source: str, index: int | None = None, half_io: bool = False) -> str:
        """x @ W.T for a checkpoint matrix W [out, in] (or expert `index` of a 3-D one), at its stored precision."""
        scheme = self.weights.scheme(source)
        if not scheme.quantized:
            if index is None:
                return self.op("MatMul", x, self.weight(source, "linear"))
            raise ValueError("float experts are batched, not split")
        return quantized_matmul(self, x, source, scheme, index, half_io)

    def add_input(self, entry: dict):
        self.inputs.append(helper.make_tensor_value_info(entry["name"], ONNX_DTYPES[entry["dtype"]], entry["shape"]))
        return entry["name"]

    def add_output(self, value: str, entry: dict):
        self.nodes.append(helper.make_node("Identity", [value], [entry["name"]], name=f"output/{entry['name']}"))
        self.outputs.append(helper.make_tensor_value_info(entry["name"], ONNX_DTYPES[entry["dtype"]], entry["shape"]))

    def model(self) -> onnx.ModelProto:
        used = {name for node in self.nodes for name in node.input} | {  # a quantized tensor's parts serve several uses
            name for node in self.nodes for attr in node.attribute if attr.g for inner in attr.g.node for name in inner.input}
        initializers = [t for t in self.initializers if t.name in used]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(node.domain == CONTRIB for node in self.nodes):
            opsets.append(helper.make_opsetid(CONTRIB, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="dg-export")
        model.ir_version = 10
        return model


# --- modules, in transformers' names -----------------------------------------------------------------------------

def rms_norm(g: Graph, x: str, source: str | None, eps: float) -> str:
    """DiffusionGemmaRMSNorm: x * (mean(x^2) + eps)^-0.5 [* weight]; `source` None is the scale-free variant."""
    mean_square = g.op("ReduceMean", g.op("Mul", x, x), g.const([-1]), keepdims=1)
    normed = g.op("Mul", x, g.op("Pow", g.op("Add", mean_square, g.const(eps, np.float32)), g.const(-0.5, np.float32)))
    return g.op("Mul", normed, g.weight(source)) if source else normed


def gelu_tanh(g: Graph, x: str) -> str:
    return g.op("Gelu", x, approximate="tanh")


def embed_tokens(g: Graph, ids: str, c: "ModelShape") -> str:
    """DiffusionGemmaTextScaledWordEmbedding: rows of the (tied) embedding times sqrt(hidden)."""
    source = f"{c.embed_prefix}.embed_tokens.weight"
    with g.scope("embed_tokens"):
        if not g.weights.scheme(source).quantized:
            rows = g.op("Gather", g.weight(source, rows=c.vocab_rows), ids, axis=0)
        else:  # int8 rows and a scale per row
            parts = g.stored(source, "as_is", c.vocab_rows)
            values = g.op("Cast", g.op("Gather", parts["weight"], ids, axis=0), to=TensorProto.FLOAT)
            rows = g.op("Mul", values, g.op("Unsqueeze", g.op("Gather", parts["scale"], ids, axis=0), g.const([-1])))
        return g.op("Mul", rows, g.const(c.hidden**0.5, np.float32))


def place_image_features(g: Graph, input_ids: str, embedded: str, features: str, c: "ModelShape") -> str:
    """DiffusionGemmaEncoderModel's masked_scatter: the embeddings of the image tokens replaced by the image
    features ([image tokens, hidden], row by row of the batch, then in order). Image tokens beyond the features
    (none, when no image is given) keep their embedding, as transformers' do when it gets no pixels."""
    with g.scope("image_features"):
        image = image_tokens(g, input_ids, features, c)
        flat = g.op("Reshape", image, g.const([-1]))
        count = g.op("Gather", g.op("Shape", features), g.const(0), axis=0)
        order = g.op("Sub", g.op("CumSum", g.op("Cast", flat, to=TensorProto.INT64), g.const(0)), g.const(1))
        rows = g.op("Concat", features, g.const(np.zeros((1, c.hidden)), np.float32), axis=0)  # text rows read this
        placed = g.op("Gather", rows, g.op("Where", flat, order, count), axis=0)
        placed = g.op("Reshape", placed, g.op("Shape", embedded))
        return g.op("Where", g.op("Unsqueeze", image, g.const([-1])), placed, embedded)


def image_tokens(g: Graph, input_ids: str, features: str, c: "ModelShape") -> str:
    """[B, T] booleans: image tokens, when image features are given (transformers' mm_token_type_ids)."""
    given = g.op("Greater", g.op("Gather", g.op("Shape", features), g.const(0), axis=0), g.const(0))
    return g.op("And", g.op("Equal", input_ids, g.const(c.image_token_id)), given)


def same_image(g: Graph, input_ids: str, features: str, c: "ModelShape") -> str:
    """[B, T, T] booleans: both tokens belong to the same image (a run of image tokens is one image), which
    `use_bidirectional_attention: "vision"` lets see each other both ways, past the sliding window too."""
    with g.scope("same_image"):
        image = image_tokens(g, input_ids, features, c)
        counted = g.op("Cast", image, to=TensorProto.INT64)
        before = g.op("Pad", g.op("Slice", counted, g.const([0]), g.const([-1]), g.const([1])), g.const([0, 1, 0, 0]))
        group = g.op("CumSum", g.op("Cast", g.op("Greater", counted, before), to=TensorProto.INT64), g.const(1))
        same = g.op("Equal", g.op("Unsqueeze", group, g.const([2])), g.op("Unsqueeze", group, g.const([1])))
        both = g.op("And", g.op("Unsqueeze", image, g.const([2])), g.op("Unsqueeze", image, g.const([1])))
        return g.op("And", same, both)


def with_past(g: Graph, new_keys: str, past_key: str) -> str:
    """A [B, T, T] mask over the new tokens as [B, 1, 1, T, past + T]: no past key is set."""
    shape = g.op("Concat", g.op("Slice", g.op("Shape", new_keys), g.const([0]), g.const([2])),
                 g.op("Slice", g.op("Shape", past_key), g.const([2]), g.const([3])), axis=0)
    past = g.op("Expand", g.const(False, np.bool_), shape)
    return g.op("Unsqueeze", g.op("Concat", past, new_keys, axis=2), g.const([1, 2]))


def rotary_emb(g: Graph, position_ids: str, inv_freq: np.ndarray, layer_type: str) -> tuple[str, str]:
    """DiffusionGemmaTextRotaryEmbedding for one layer type: cos and sin [B, T, 1, head_dim]."""
    with g.scope(f"rotary_emb.{layer_type}"):
        positions = g.op("Unsqueeze", g.op("Cast", position_ids, to=TensorProto.FLOAT), g.const([-1]))
        freqs = g.op("Mul", positions, g.const(inv_freq, np.float32))
        emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([2]))
        return g.op("Cos", emb), g.op("Sin", emb)


def apply_rotary(g: Graph, x: str, cos: str, sin: str, head_dim: int) -> str:
    first, second = g.op("Split", x, g.const([head_dim // 2, head_dim // 2]), axis=-1, outputs=2)
    rotated = g.op("Concat", g.op("Neg", second), first, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def causal_mask(g: Graph, position_ids: str, past_key: str, window: int | None, past: str | None = None) -> str:
    """[B, 1, 1, T, past + T] booleans: keys at or before the query, and within the window for sliding layers.

    Past keys are the tokens just before the new ones, so their positions follow from the first new position.
    `past`: how many of the past slots are real (static graphs; default: all of them).
    """
    with g.scope("causal_mask" if window is None else "sliding_window_mask"):
        slots = g.op("Gather", g.op("Shape", past_key), g.const(2), axis=0)
        past = past or slots
        first = g.op("Slice", position_ids, g.const([0]), g.const([1]), g.const([1]))
        offsets = g.op("Range", g.const(0), slots, g.const(1))
        past_positions = g.op("Add", g.op("Sub", first, past), offsets)
        keys = g.op("Unsqueeze", g.op("Concat", past_positions, position_ids, axis=1), g.const([1, 2, 3]))
        queries = g.op("Unsqueeze", position_ids, g.const([1, 2, 4]))
        mask = g.op("LessOrEqual", keys, queries)
        if window is not None:
            mask = g.op("And", mask, g.op("Greater", keys, g.op("Sub", queries, g.const(window))))
        return mask


def real_keys(g: Graph, past_key: str, input_ids: str, past: str, new_tokens: str) -> str:
    """[1, 1, 1, 1, slots + T] booleans of a static graph: the first `past` cache slots and the first `new_tokens`
    new tokens are real, the rest padding that no query may see."""
    with g.scope("real_keys"):
        def first(count: str, of: str, axis: int) -> str:
            size = g.op("Gather", g.op("Shape", of), g.const(axis), axis=0)
            return g.op("Less", g.op("Range", g.const(0), size, g.const(1)), count)

        keys = g.op("Concat", first(past, past_key, 2), first(new_tokens, input_ids, 1), axis=0)
        return g.op("Reshape", keys, g.const([1, 1, 1, 1, -1]))


def self_attn(g: Graph, x: str, prefix: str, layer: dict, heads: int, eps: float, rope, past_key: str,
              past_value: str, mask: str | None) -> tuple[str, str, str]:
    """DiffusionGemma{Encoder,Decoder}TextAttention with explicit past KV. Returns (output, new keys, new values).

    Grouped KV heads are handled by broadcasting a [B, kv_heads, groups, T, D] query against [B, kv_heads, 1, S, D]
    keys (head h reads KV head h // groups, as repeat_kv does); scaling is 1.0 (the q/k norms scale).
    """
    kv_heads, head_dim = layer["kv_heads"], layer["head_dim"]
    groups = heads // kv_heads
    with g.scope("self_attn"):
        query = g.op("Reshape", g.linear(x, f"{prefix}.q_proj.weight"), g.const([0, 0, heads, head_dim]))
        query = apply_rotary(g, rms_norm(g, query, f"{prefix}.q_norm.weight", eps), *rope, head_dim)
        raw_key = g.op("Reshape", g.linear(x, f"{prefix}.k_proj.weight"), g.const([0, 0, kv_heads, head_dim]))
        # Full-attention layers have no v_proj: their values are the keys before k_norm and rotary.
        raw_value = raw_key
        if layer["type"] == "sliding_attention":
            raw_value = g.op("Reshape", g.linear(x, f"{prefix}.v_proj.weight"), g.const([0, 0, kv_heads, head_dim]))
        key = g.op("Transpose", apply_rotary(g, rms_norm(g, raw_key, f"{prefix}.k_norm.weight", eps), *rope, head_dim),
                   perm=[0, 2, 1, 3])
        value = g.op("Transpose", rms_norm(g, raw_value, None, eps), perm=[0, 2, 1, 3])

        keys = g.op("Unsqueeze", g.op("Concat", past_key, key, axis=2), g.const([2]))
        values = g.op("Unsqueeze", g.op("Concat", past_value, value, axis=2), g.const([2]))
        query = g.op("Reshape", g.op("Transpose", query, perm=[0, 2, 1, 3]), g.const([0, kv_heads, groups, -1, head_dim]))
        scores = g.op("MatMul", query, g.op("Transpose", keys, perm=[0, 1, 2, 4, 3]))
        if mask is not None:
            scores = g.op("Where", mask, scores, g.const(FLOAT_MIN, np.float32))
        attended = g.op("MatMul", g.op("Softmax", scores, axis=-1), values)  # [B, kv_heads, groups, T, D]
        attended = g.op("Reshape", attended, g.const([0, heads, -1, head_dim]))
        attended = g.op("Reshape", g.op("Transpose", attended, perm=[0, 2, 1, 3]), g.const([0, 0, heads * head_dim]))
        return g.linear(attended, f"{prefix}.o_proj.weight"), key, value


def mlp(g: Graph, x: str, prefix: str) -> str:
    """DiffusionGemmaText4MLP (and the self-conditioning block's MLP): down(gelu_tanh(gate(x)) * up(x))."""
    gate = gelu_tanh(g, g.linear(x, f"{prefix}.gate_proj.weight"))
    return g.linear(g.op("Mul", gate, g.linear(x, f"{prefix}.up_proj.weight")), f"{prefix}.down_proj.weight")


def router(g: Graph, flat: str, prefix: str, c: "ModelShape") -> tuple[str, str]:
    """DiffusionGemmaTextRouter: top-k experts per token and their renormalised, per-expert-scaled weights."""
    with g.scope("router"):
        x = g.op("Mul", g.op("Mul", rms_norm(g, flat, None, c.eps), g.weight(f"{prefix}.scale")),
                 g.const(c.hidden**-0.5, np.float32))
        scores = g.op("Gemm", x, g.weight(f"{prefix}.proj.weight", rows=c.expert_rows), transB=1)
        probs = g.op("Softmax", scores, axis=-1)
        top_weights, top_index = g.op("TopK", probs, g.const([c.top_k]), axis=-1, largest=1, sorted=1, outputs=2)
        top_weights = g.op("Div", top_weights, g.op("ReduceSum", top_weights, g.const([-1]), keepdims=1))
        scale = g.op("Gather", g.weight(f"{prefix}.per_expert_scale", rows=c.expert_rows), top_index, axis=0)
        return g.op("Mul", top_weights, scale), top_index


def experts(g: Graph, flat: str, top_index: str, top_weights: str, prefix: str, c: "ModelShape") -> str:
    """DiffusionGemmaTextExperts: every (token, expert) pair through its expert, weighted and summed per token.
    flat [N, H] -> [N, H]. Float experts run as a capacity dispatch (see the module docstring); quantized kernels
    are 2-D, so quantized experts run on the pairs sorted by expert, each expert's rows through its own MatMul."""
    with g.scope("experts"):
        pair_expert = g.op("Reshape", top_index, g.const([-1]))  # [N*K], token-major
        one_hot = g.op("Cast", g.op("Equal", g.op("Unsqueeze", pair_expert, g.const([1])),
                                    g.const(np.arange(c.num_experts)[None])), to=TensorProto.INT64)  # [N*K, E]
        pairs = g.op("Squeeze", g.op("Shape", pair_expert), g.const([0]))
        hidden = g.op("Slice", g.op("Shape", flat), g.const([1]), g.const([2]))
        if g.moe == "tiled":
            return experts_tiled(g, flat, top_index, top_weights, prefix, c)
        if g.weights.scheme(f"{prefix}.gate_up_proj").quantized:
            per_pair = experts_by_sorting(g, flat, pair_expert, one_hot, pairs, prefix, c)
        else:
            per_pair = experts_by_capacity(g, flat, pair_expert, one_hot, pairs, hidden, prefix, c)
        per_pair = g.op("Mul", per_pair, g.op("Reshape", top_weights, g.const([-1, 1])))
        return g.op("ReduceSum", g.op("Reshape", per_pair, g.op("Concat", g.const([-1, c.top_k]), hidden, axis=0)),
                    g.const([1]), keepdims=0)


def expert_mlp(g: Graph, x: str, prefix: str, c: "ModelShape", rows: str | None) -> str:
    """down(gelu_tanh(gate) * up) of each expert; x is [E, C, in] (batched) or, with `rows` ([E] counts), the
    pairs sorted by expert [P, in]."""
    gate_up = expert_matmul(g, x, f"{prefix}.gate_up_proj", c, rows)
    gate, up = g.op("Split", gate_up, g.const([c.expert_width, c.expert_width]), axis=-1, outputs=2)
    return expert_matmul(g, g.op("Mul", gelu_tanh(g, gate), up), f"{prefix}.down_proj", c, rows)


def experts_tiled(g: Graph, flat: str, top_index: str, top_weights: str, prefix: str, c: "ModelShape") -> str:
    """The MoE block OpenVINO recognises (its ConvertTiledMoeBlockTo3GatherMatmuls; optimum-intel exports Gemma 4
    so): every token tiled to every expert, gate, up and down as batched MatMuls over [E, out, in] weights read
    transposed, the top-k weights scattered into a [tokens, experts] table that weights each expert's output, and
    the sum over experts. As written this is the dense all-experts computation (E / k times the work); OpenVINO
    turns it into GatherMatmuls that run each token through its own k experts only, compressed weights kept
    compressed (on CPU and XMX GPUs; its GPU plugin further into one fused MoE kernel)."""
    tokens = g.op("Slice", g.op("Shape", flat), g.const([0]), g.const([1]))
    table = g.op("ScatterElements", g.op("ConstantOfShape", g.op("Concat", tokens, g.const([c.num_experts]), axis=0),
                                         value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
                 top_index, top_weights, axis=1)  # [T, E]
    routing = g.op("Reshape", g.op("Transpose", table, perm=[1, 0]), g.const([c.num_experts, -1, 1]))
    tiled = g.op("Reshape", g.op("Tile", flat, g.const([c.num_experts, 1])), g.const([c.num_experts, -1, c.hidden]))
    gate = g.op("MatMul", tiled, expert_weights(g, f"{prefix}.gate_up_proj", "gate", c))
    up = g.op("MatMul", tiled, expert_weights(g, f"{prefix}.gate_up_proj", "up", c))
    down = g.op("MatMul", g.op("Mul", gelu_tanh(g, gate), up), expert_weights(g, f"{prefix}.down_proj", "as_is", c))
    down = g.op("Reshape", down, g.const([c.num_experts, -1, c.hidden]))
    return g.op("ReduceSum", g.op("Mul", down, routing), g.const([0]), keepdims=0)


def expert_weights(g: Graph, source: str, layout: str, c: "ModelShape") -> str:
    """All experts' [E, out, in] matrices of `source` (or the gate or up half of gate_up_proj), transposed to
    [E, in, out] by a Transpose that OpenVINO folds into its MatMul; quantized ones in NNCF's decompression form."""
    scheme = g.weights.scheme(source)
    if not scheme.quantized:
        return g.op("Transpose", g.weight(source, layout, c.expert_rows), perm=[0, 2, 1])
    shape = g.weights.checkpoint.shape(g.weights.resolve(source))
    experts, out, columns = shape[0], shape[1] // (2 if layout in ("gate", "up") else 1), shape[2]
    if scheme.format == "int8":
        parts = g.stored(source, layout, c.expert_rows, scale=(TensorProto.FLOAT, [experts, out, 1]))
        weight = g.op("Mul", g.op("Cast", parts["weight"], to=TensorProto.FLOAT), parts["scale"])
    else:
        weight = int4_decompressed(g, source, layout, scheme, [experts, out, columns], f"{source}.{layout}",
                                   rows=c.expert_rows)
    return g.op("Transpose", weight, perm=[0, 2, 1])


def experts_by_capacity(g: Graph, flat, pair_expert, one_hot, pairs, hidden, prefix: str, c: "ModelShape") -> str:
    """Each pair gets a slot in an [E, capacity, H] buffer (capacity: the most pairs any expert received), both
    projections are one batched MatMul, and each pair's row is gathered back. Cost: capacity / mean load."""
    slot = g.op("Sub", g.op("ReduceSum", g.op("Mul", g.op("CumSum", one_hot, g.const(0)), one_hot), g.const([1]),
                            keepdims=0), g.const(1))  # the number of earlier pairs routed to the same expert
    capacity = g.op("ReduceMax", g.op("ReduceSum", one_hot, g.const([0]), keepdims=0), g.const([0]), keepdims=1)
    where = g.op("Concat", g.op("Unsqueeze", pair_expert, g.const([1])), g.op("Unsqueeze", slot, g.const([1])), axis=1)
    pair_token = g.op("Div", g.op("Range", g.const(0), pairs, g.const(1)), g.const(c.top_k))
    empty = g.op("ConstantOfShape", g.op("Concat", g.const([c.num_experts]), capacity, hidden, axis=0),
                 value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    dispatched = g.op("ScatterND", empty, where, g.op("Gather", flat, pair_token, axis=0))  # [E, C, H]
    return g.op("GatherND", expert_mlp(g, dispatched, prefix, c, None), where)


def experts_by_sorting(g: Graph, flat, pair_expert, one_hot, pairs, prefix: str, c: "ModelShape") -> str:
    """The pairs sorted by expert, split into one block of rows per expert (its count, maybe none), each through
    its expert's quantized MatMuls, then put back in pair order. No padding: the work is exactly the pairs'."""
    counts = g.op("ReduceSum", one_hot, g.const([0]), keepdims=0)  # [E]
    _, order = g.op("TopK", g.op("Cast", pair_expert, to=TensorProto.FLOAT), g.op("Unsqueeze", pairs, g.const([0])),
                    largest=0, sorted=1, outputs=2)  # pair indices by expert (within an expert, any order does)
    sorted_rows = g.op("Gather", flat, g.op("Div", order, g.const(c.top_k)), axis=0)  # pairs are token-major
    out = expert_mlp(g, sorted_rows, prefix, c, counts)
    inverse = g.op("ScatterElements", g.op("ConstantOfShape", g.op("Unsqueeze", pairs, g.const([0])),
                                           value=helper.make_tensor("zero", TensorProto.INT64, [1], [0])),
                   order, g.op("Range", g.const(0), pairs, g.const(1)), axis=0)
    return g.op("Gather", out, inverse, axis=0)


def expert_matmul(g: Graph, x: str, source: str, c: "ModelShape", rows: str | None) -> str:
    """Float: [E, C, in] @ each expert's W.T, one batched MatMul. Quantized: x [P, in] sorted by expert, split by
    `rows` into one quantized MatMul per expert (2 x E nodes a layer)."""
    scheme = g.weights.scheme(source)
    if not scheme.quantized:
        return g.op("MatMul", x, g.weight(source, "linear", c.expert_rows))
    half = reads_half(g, scheme)
    first = c.expert_rows[0] if c.expert_rows else 0
    pieces = g.op("Split", g.op("Cast", x, to=TensorProto.FLOAT16) if half else x, rows, axis=0,
                  outputs=c.num_experts)
    pieces = [pieces] if c.num_experts == 1 else pieces
    out = g.op("Concat", *(g.linear(piece, source, first + e, half) for e, piece in enumerate(pieces)), axis=0)
    return g.op("Cast", out, to=TensorProto.FLOAT) if half else out


def text_layer(g: Graph, x: str, i: int, c: "ModelShape", rope, past_key: str, past_value: str,
               mask: str | None, layer_scalar: str) -> tuple[str, str, str]:
    """DiffusionGemma{Encoder,Decoder}TextLayer: attention, then the dense MLP and the routed experts side by side."""
    prefix, eps = f"{c.layers_prefix}.{i}", c.eps
    with g.scope(f"layers.{i}"):
        normed = rms_norm(g, x, f"{prefix}.input_layernorm.weight", eps)
        attended, key, value = self_attn(g, normed, f"{prefix}.self_attn", c.layout[i], c.heads, eps, rope,
                                         past_key, past_value, mask)
        x = g.op("Add", x, rms_norm(g, attended, f"{prefix}.post_attention_layernorm.weight", eps))

        with g.scope("mlp"):
            dense = mlp(g, rms_norm(g, x, f"{prefix}.pre_feedforward_layernorm.weight", eps), f"{prefix}.mlp")
        dense = rms_norm(g, dense, f"{prefix}.post_feedforward_layernorm_1.weight", eps)
        flat = g.op("Reshape", x, g.const([-1, c.hidden]))
        top_weights, top_index = router(g, flat, f"{prefix}.router", c)
        routed = experts(g, rms_norm(g, flat, f"{prefix}.pre_feedforward_layernorm_2.weight", eps), top_index,
                         top_weights, f"{prefix}.experts", c)
        routed = rms_norm(g, g.op("Reshape", routed, g.op("Shape", x)), f"{prefix}.post_feedforward_layernorm_2.weight", eps)
        x = g.op("Add", x, rms_norm(g, g.op("Add", dense, routed), f"{prefix}.post_feedforward_layernorm.weight", eps))
        return g.op("Mul", x, layer_scalar), key, value


class ModelShape:
    """What the graph functions need from DiffusionGemmaConfig, and the checkpoint's naming."""

    layers_prefix = "model.decoder.layers"  # the encoder's layers are tied to these, but for their layer scalars
    encoder_layers_prefix = "model.encoder.language_model.layers"
    embed_prefix = "model.decoder"

    def __init__(self, config):
        from .graphs import kv_layout

        text = config.text_config
        if getattr(text, "attention_bias", False) or getattr(text, "use_bidirectional_attention", None) == "all":
            from dg_runtime.errors import UserError

            raise UserError("this config uses attention biases or a bidirectional encoder, which dg-export does not "
                            "support yet")
        self.config, self.text = config, text
        self.layout, self.layer_types = kv_layout(text), list(text.layer_types)
        self.hidden, self.heads, self.eps = text.hidden_size, text.num_attention_heads, text.rms_norm_eps
        self.num_experts, self.top_k, self.expert_width = text.num_experts, text.top_k_experts, text.moe_intermediate_size
        self.sliding_window, self.vocab = text.sliding_window, text.vocab_size
        self.softcap = text.final_logit_softcapping
        tied = getattr(config, "tie_word_embeddings", True)
        self.lm_head = f"{self.embed_prefix}.embed_tokens.weight" if tied else "lm_head.weight"
        self.inv_freq = rotary_frequencies(text)
        self.expert_rows = self.vocab_rows = None  # all of them; validation narrows these to samples
        self.image_token_id = config.image_token_id
        self.bidirectional_images = getattr(text, "use_bidirectional_attention", None) == "vision"

    def sample(self, experts: tuple[int, int] | None = None, vocab: tuple[int, int] | None = None) -> "ModelShape":
        """The same model restricted to a range of its experts and of its vocabulary."""
        narrowed = copy.copy(self)
        if experts is not None:
            narrowed.expert_rows, narrowed.num_experts = experts, experts[1] - experts[0]
        if vocab is not None:
            narrowed.vocab_rows, narrowed.vocab = vocab, vocab[1] - vocab[0]
        return narrowed


def rotary_frequencies(text_config) -> dict[str, np.ndarray]:
    """inv_freq per layer type, from transformers' own rotary module (default and proportional RoPE alike)."""
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaTextRotaryEmbedding

    rotary = DiffusionGemmaTextRotaryEmbedding(text_config)
    frequencies = {}
    for layer_type in set(text_config.layer_types):
        if getattr(rotary, f"{layer_type}_attention_scaling") != 1.0:
            from dg_runtime.errors import UserError

            raise UserError(f"RoPE type {rotary.rope_type[layer_type]} scales attention; dg-export does not support it")
        frequencies[layer_type] = getattr(rotary, f"{layer_type}_inv_freq").numpy()
    return frequencies


def build_model(c: ModelShape, spec: dict, weights, target: str = "onnx", moe: str = "sorted") -> onnx.ModelProto:
    """The encoder and the denoiser in one graph (see graphs.graph_specs): the layers, and so the weights, are
    shared; `denoising` switches the mask, the layer scalars and the input embedding."""
    g = Graph("model", weights, target, moe)
    inputs = {e["name"]: g.add_input(e) for e in spec["inputs"]}
    input_ids, position_ids, denoising = inputs["input_ids"], inputs["position_ids"], inputs["denoising"]
    past = [inputs[e["name"]] for e in spec["inputs"] if e["name"].startswith("past.")]

    tokens = embed_tokens(g, input_ids, c)
    features = inputs.get("image_features")
    if features:
        tokens = place_image_features(g, input_ids, tokens, features, c)
        images_see_each_other = same_image(g, input_ids, features, c) if c.bidirectional_images else None
    x = g.op("Where", denoising, canvas_embedding(g, tokens, inputs["soft_embedding"], c), tokens)
    rope = {t: rotary_emb(g, position_ids, c.inv_freq[t], t) for t in sorted(set(c.layer_types))}
    static = "new_tokens" in inputs  # fixed shapes, padded: counts say what is real (graphs.static_graph_specs)
    masks = {}
    for i, layer_type in enumerate(c.layer_types):
        if layer_type not in masks:  # every layer of a type has the same past length
            window = c.sliding_window if layer_type == "sliding_attention" else None
            filled = inputs[f"past_{layer_type.split('_')[0]}_length"] if static else None
            # The canvas sees every cached key and itself, bidirectionally.
            masks[layer_type] = g.op("Or", causal_mask(g, position_ids, past[2 * i], window, filled), denoising)
            if features and c.bidirectional_images:
                masks[layer_type] = g.op("Or", masks[layer_type], with_past(g, images_see_each_other, past[2 * i]))
            if static:
                masks[layer_type] = g.op("And", masks[layer_type],
                                         real_keys(g, past[2 * i], input_ids, filled, inputs["new_tokens"]))
    presents = []
    for i, layer_type in enumerate(c.layer_types):
        scalar = g.op("Where", denoising, g.weight(f"{c.layers_prefix}.{i}.layer_scalar"),
                      g.weight(f"{c.encoder_layers_prefix}.{i}.layer_scalar"))
        x, key, value = text_layer(g, x, i, c, rope[layer_type], past[2 * i], past[2 * i + 1], masks[layer_type],
                                   scalar)
        presents += [key, value]

    with g.scope("head_tokens"):
        head_tokens = g.op("Slice", g.op("Shape", inputs["sample_uniform"]), g.const([1]), g.const([2]))
        x = g.op("Slice", x, g.op("Neg", head_tokens), g.const([np.iinfo(np.int64).max]), g.const([1]))
    if g.target == "onnx" and large_head(c.config):
        outputs = head_in_chunks(g, x, inputs["temperature"], inputs["sample_uniform"], denoising, c)
    else:  # small heads gain nothing; OpenVINO reads weights inside a Loop body as inputs: no compressed kernels
        soft_rows = head_tokens if static else g.op("Where", denoising, head_tokens, g.const([0]))  # static: always
        outputs = denoiser_head(g, x, inputs["temperature"], inputs["sample_uniform"], c, soft_rows)
    outputs.update(zip((e["name"] for e in spec["outputs"] if e["name"].startswith("present.")), presents))
    for entry in spec["outputs"]:
        g.add_output(outputs[entry["name"]], entry)
    return g.model()


MOE_FORMS = ("sorted", "tiled")  # the routed experts: today's forms (capacity or sorted), or OpenVINO's tiled block
HEAD_CHUNK = 32  # rows of the head at a time on ONNX Runtime: [32, 262144] temporaries are 34 MB at the 26B's size


def head_in_chunks(g: Graph, x: str, temperature: str, uniform: str, denoising: str, c: ModelShape) -> dict[str, str]:
    """The head in a Loop over chunks of rows, so that its vocabulary-sized temporaries are a chunk's, not the
    canvas' (at the 26B's vocabulary a [256, 262144] float tensor is 268 MB and the head makes several). Rows
    (batch x head tokens, flattened) go HEAD_CHUNK at a time where that divides them, else a batch row at a time."""
    with g.scope("head"):
        batch_rows = g.op("Slice", g.op("Shape", x), g.const([0]), g.const([2]))  # [B, R]
        rows = g.op("ReduceProd", batch_rows, g.const([0]), keepdims=1)
        flat_x = g.op("Reshape", x, g.const([-1, c.hidden]))
        flat_u = g.op("Reshape", uniform, g.const([-1]))
        head_tokens = g.op("Slice", batch_rows, g.const([1]), g.const([2]))
        divides = g.op("Equal", g.op("Mod", rows, g.const([HEAD_CHUNK])), g.const([0]))
        chunk = g.op("Where", divides, g.const([HEAD_CHUNK]), head_tokens)
        trips = g.op("Squeeze", g.op("Div", rows, chunk), g.const([0]))
        chunk_soft_rows = g.op("Where", denoising, chunk, g.const([0]))
        names = ["argmax", "sampled", "entropy", "next_soft_embedding"]  # a large head's logits are no output
        with g.loop_body("head/loop") as (body_nodes, iteration, condition):
            start = g.op("Mul", g.op("Unsqueeze", iteration, g.const([0])), chunk)
            stop = g.op("Add", start, chunk)
            x_chunk = g.op("Unsqueeze", g.op("Slice", flat_x, start, stop, g.const([0])), g.const([0]))
            u_chunk = g.op("Unsqueeze", g.op("Slice", flat_u, start, stop, g.const([0])), g.const([0]))
            chunk_outputs = denoiser_head(g, x_chunk, temperature, u_chunk, c, chunk_soft_rows)
            body_outputs = [g.op("Identity", condition)] + [chunk_outputs[n] for n in names]
        body = helper.make_graph(
            body_nodes, "head_chunk",
            [helper.make_tensor_value_info(iteration, TensorProto.INT64, []),
             helper.make_tensor_value_info(condition, TensorProto.BOOL, [])],
            [helper.make_tensor_value_info(name, dtype, None) for name, dtype in zip(body_outputs, [
                TensorProto.BOOL, TensorProto.INT64, TensorProto.INT64, TensorProto.FLOAT, TensorProto.FLOAT])])
        stacked = g.op("Loop", trips, g.const(True, np.bool_), body=body, outputs=len(names))  # [trips, 1, chunk, ...]
        soft_rows = g.op("Where", denoising, head_tokens, g.const([0]))
        shapes = {"next_soft_embedding": g.op("Concat", g.op("Slice", batch_rows, g.const([0]), g.const([1])),
                                              soft_rows, g.const([c.hidden]), axis=0)}
        # allowzero: no soft embedding rows when encoding is a real 0, not "keep this dimension"
        return {n: g.op("Reshape", value, shapes.get(n, batch_rows), allowzero=1) for n, value in zip(names, stacked)}


def canvas_embedding(g: Graph, tokens: str, soft_embedding: str, c: ModelShape) -> str:
    """The decoder's input: the canvas' token embeddings plus DiffusionGemmaSelfConditioning of the previous
    step's signal."""
    with g.scope("self_conditioning"):
        signal = mlp(g, rms_norm(g, soft_embedding, "model.decoder.self_conditioning.pre_norm.weight", c.eps),
                     "model.decoder.self_conditioning")
        return rms_norm(g, g.op("Add", tokens, signal), None, c.eps)


def denoiser_head(g: Graph, x: str, temperature: str, uniform: str, c: ModelShape, soft_rows: str | None = None
                  ) -> dict[str, str]:
    """Final norm, the tied lm_head with its softcap, and the sampling head: the head's outputs by name.
    `soft_rows` ([1]) limits the next soft embedding to the first rows (none when encoding); None: all of them."""
    x = rms_norm(g, x, "model.decoder.norm.weight", c.eps)
    with g.scope("lm_head"):  # usually tied to the embedding: read transposed, so it is stored once
        flat = g.op("Reshape", x, g.const([-1, c.hidden]))
        logits = g.op("Reshape", lm_head(g, flat, c),
                      g.op("Concat", g.op("Slice", g.op("Shape", x), g.const([0]), g.const([2])), g.const([c.vocab]), axis=0))
        softcap = g.const(c.softcap, np.float32)
        logits = g.op("Mul", g.op("Tanh", g.op("Div", logits, softcap)), softcap)
    return {**sampling_head(g, logits, temperature, uniform, c, soft_rows), "logits": logits}


def lm_head(g: Graph, flat: str, c: ModelShape) -> str:
    """[N, hidden] -> [N, vocab] logits. An int8 head (the embedding's int8 rows, a scale per row): on ONNX Runtime
    DynamicQuantizeMatMul on the rows transposed (a constant it folds at load, then packs for its int8 x int8
    kernel); on OpenVINO a compressed MatMul."""
    if not g.weights.scheme(c.lm_head).quantized:
        return g.op("Gemm", flat, g.weight(c.lm_head, rows=c.vocab_rows), transB=1)
    if g.target == "onnx":
        parts = g.stored(c.lm_head, "as_is", c.vocab_rows)
        with g.in_main_graph():
            columns = g.op("Transpose", parts["weight"], perm=[1, 0])
        return g.op("DynamicQuantizeMatMul", flat, columns, parts["scale"], domain=CONTRIB)
    return g.op("MatMul", flat, g.op("Transpose", dequantized_embedding(g, c.lm_head, c), perm=[1, 0]))


def dequantized_embedding(g: Graph, source: str, c: ModelShape) -> str:
    """OpenVINO's form of an int8 embedding (or untied LM head): q * row scale, folded by its plugin into the
    MatMul."""
    parts = g.stored(source, "as_is", c.vocab_rows, scale=(TensorProto.FLOAT, [c.vocab, 1]))
    return g.op("Mul", g.op("Cast", parts["weight"], to=TensorProto.FLOAT), parts["scale"])


def soft_embedding(g: Graph, probs: str, c: ModelShape) -> str:
    """probs @ embedding * sqrt(hidden). An int8 embedding's row scales fold into probs, so the int8 rows are read
    as a [vocab, hidden] matrix with one scale per column (of ones): ONNX Runtime's int8 kernel takes it so, and
    OpenVINO's compressed MatMul must not see a scale along its reduction axis (its CPU plugin dies of SIGFPE on one
    in bf16: 2026.4, tests/test_quantize.py)."""
    source = f"{c.embed_prefix}.embed_tokens.weight"
    scheme = g.weights.scheme(source)
    if not scheme.quantized:
        return g.op("Mul", g.op("MatMul", probs, g.weight(source, rows=c.vocab_rows)), g.const(c.hidden**0.5, np.float32))
    parts = g.stored(source, "as_is", c.vocab_rows)
    scaled = g.op("Mul", probs, parts["scale"])
    if g.target == "onnx":
        product = g.op("DynamicQuantizeMatMul", scaled, parts["weight"], g.const(np.ones(c.hidden), np.float32),
                       domain=CONTRIB)
    else:
        ones = g.const(np.ones((1, c.hidden)), np.float32)
        product = g.op("MatMul", scaled, g.op("Mul", g.op("Cast", parts["weight"], to=TensorProto.FLOAT), ones))
    return g.op("Mul", product, g.const(c.hidden**0.5, np.float32))


def sampling_head(g: Graph, logits: str, temperature: str, uniform: str, c: ModelShape, soft_rows: str | None) -> dict:
    """The vocabulary-sized work of a step, kept in the graph: tempering, softmax, entropy, argmax, an
    inverse-CDF sample with the supplied uniform, and the next step's soft embedding (probs @ embedding * sqrt(H))."""
    with g.scope("sampling_head"):
        tempered = g.op("Div", logits, temperature)
        log_probs = g.op("LogSoftmax", tempered, axis=-1)
        probs = g.op("Exp", log_probs)
        plogp = g.op("Mul", probs, g.op("Max", log_probs, g.const(FLOAT_MIN, np.float32)))
        entropy = g.op("Neg", g.op("ReduceSum", plogp, g.const([-1]), keepdims=0))
        argmax = first_argmax(g, tempered, c) if g.target == "openvino" else g.op("ArgMax", tempered, axis=-1,
                                                                                   keepdims=0)
        sampled = inverse_cdf_sample(g, probs, uniform, c)
        if soft_rows is not None:
            probs = g.op("Slice", probs, g.const([0]), soft_rows, g.const([1]))
        soft = soft_embedding(g, probs, c)
        return {"argmax": argmax, "sampled": sampled, "entropy": entropy, "next_soft_embedding": soft}


def first_argmax(g: Graph, x: str, c: ModelShape) -> str:
    """ArgMax (the first of equal maxima) as max, compare, and the least index where they are equal: OpenVINO runs
    ArgMax as a TopK, 165 ms over the 26B's [256, 262144] logits, against ~30 ms for these three passes."""
    top = g.op("ReduceMax", x, g.const([-1]), keepdims=1)
    index = g.op("Range", g.const(0.0, np.float32), g.const(float(c.vocab), np.float32), g.const(1.0, np.float32))
    first = g.op("ReduceMin", g.op("Where", g.op("Equal", x, top), index, g.const(float(c.vocab), np.float32)),
                 g.const([-1]), keepdims=0)  # float32 holds every index exactly (below 2^24)
    return g.op("Cast", first, to=TensorProto.INT64)


def inverse_cdf_sample(g: Graph, probs: str, uniform: str, c: ModelShape) -> str:
    """The number of tokens whose CDF is at or below the uniform (capped at the last token), in two levels: the
    blocks of `sample_block` tokens whose cumulative sum is at or below it, then the tokens of the next block.
    A running sum over the whole vocabulary was the step's largest vocabulary-side cost after the two matmuls
    (0.23 s of ONNX Runtime's 26B-wide step); per block, one pass over the probabilities remains (their block
    sums). The sums are float32 in another order than one running sum: within the rounding that validation allows
    a sample (4 sqrt(V) ulps). Counts are float32 (exact up to 2^24)."""
    block = sample_block(c.vocab)
    lead = g.op("Slice", g.op("Shape", probs), g.const([0]), g.const([-1]))
    blocks = g.op("Reshape", probs, g.op("Concat", lead, g.const([c.vocab // block, block]), axis=0))  # [.., n, B]
    block_sums = g.op("ReduceSum", blocks, g.const([-1]), keepdims=0)
    block_cdf = g.op("CumSum", block_sums, g.const(-1))
    u = g.op("Unsqueeze", uniform, g.const([-1]))

    def count_at_or_below(cdf: str) -> str:
        below = g.op("Cast", g.op("LessOrEqual", cdf, u), to=TensorProto.FLOAT)
        return g.op("Cast", g.op("ReduceSum", below, g.const([-1]), keepdims=0), to=TensorProto.INT64)

    whole = g.op("Min", count_at_or_below(block_cdf), g.const(c.vocab // block - 1))  # the block that holds it
    before = g.op("GatherElements", g.op("Sub", block_cdf, block_sums), g.op("Unsqueeze", whole, g.const([-1])),
                  axis=-1)
    picked = g.op("Unsqueeze", whole, g.const([-1, -2]))
    inside = g.op("GatherElements", blocks, g.op("Expand", picked, g.op("Concat", lead, g.const([1, block]), axis=0)),
                  axis=-2)
    inside_cdf = g.op("Add", g.op("CumSum", g.op("Squeeze", inside, g.const([-2])), g.const(-1)), before)
    sampled = g.op("Add", g.op("Mul", whole, g.const(block)), count_at_or_below(inside_cdf))
    return g.op("Min", sampled, g.const(c.vocab - 1))


def sample_block(vocab: int) -> int:
    """The largest divisor of the vocabulary not above its square root (262,144: 512)."""
    return next(d for d in range(int(vocab**0.5), 0, -1) if vocab % d == 0)


def build_graphs(config, weights, target: str = "onnx", moe: str = "sorted",
                 static: dict | None = None, images: bool = False) -> dict[str, onnx.ModelProto]:
    """The artifact's graphs for one target ("onnx" or "openvino": they differ in quantized weights, the head of a
    large vocabulary and, with `moe` "tiled", the routed experts); `static`: sizes (graphs.static_shapes) that fix
    every shape, OpenVINO's tiled MoE only (the sorted form's shapes follow the routing); `images`: the vision graph
    too, and the model graph takes image features."""
    if moe not in MOE_FORMS or (moe == "tiled" and target != "openvino") or (static and moe != "tiled"):
        raise ValueError(f"no MoE form {moe!r} for {target}{' with static shapes' if static else ''}")
    shape = ModelShape(config)
    specs = static_graph_specs(config, static) if static else graph_specs(config, images=images)
    graphs = {"model": build_model(shape, specs["model"], weights, target, moe)}
    if images:
        from .vision import build_vision_model

        graphs["vision"] = build_vision_model(config, weights, target)
    return graphs
