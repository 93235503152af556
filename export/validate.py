"""Export-time validation: transformers and the exported graphs on the same random inputs.

The prompt is longer than the sliding window and is followed by a second chunk, so the sliding-window cache,
the causal window inside the encoder and the denoiser's view of a trimmed cache are all exercised.

The reference is transformers in float64, and a graph is judged against the error transformers' own float32 makes
on the same inputs: a graph passes when it is within FLOAT32_ERROR_FACTOR times that error (or within `atol`,
the floor for well-conditioned models). A constant tolerance against float32 transformers cannot tell an
ill-conditioned model (where float32 itself drifts by more than 1e-4) from a wrong graph, and its verdict moved
with the float32 reference from run to run.
"""

import copy
import re
from pathlib import Path

import numpy as np
import onnx
import torch
from transformers import DynamicCache

from dg_runtime.backends import open_graph
from dg_runtime.graph import ModelGraph

from . import reference

EXPERT_SAMPLE = 16
VOCAB_SAMPLE = 16384
# How much further from float64 transformers a graph may be than float32 transformers is. Measured: exact graphs
# sit at 0.3-1.5x float32's error; a GELU on the wrong projection, a window one token too wide or a corrupted
# tensor at 10-1000x.
FLOAT32_ERROR_FACTOR = 4


def compare(expected: np.ndarray, actual: np.ndarray) -> float:
    """The largest |actual - expected| / (1 + |expected|): an absolute difference for values up to about 1 and a
    relative one beyond (logits reach 30, entropies sum 262,144 terms)."""
    expected = expected.astype(np.float64)
    return float(np.max(np.abs(expected - actual) / (1 + np.abs(expected)))) if expected.size else 0.0


def float_row(backend: str, graph: str, output: str, expected64, expected32, actual, atol: float) -> dict:
    """A float output's row: its error against float64, float32 transformers' own error, and the bound between."""
    pairs = list(zip(expected64, expected32, actual)) if isinstance(actual, list) else [(expected64, expected32, actual)]
    diff = max(compare(e64, a) for e64, _, a in pairs)
    own = max(compare(e64, e32) for e64, e32, _ in pairs)
    return {"backend": backend, "graph": graph, "output": output, "diff": diff, "float32_error": own,
            "bound": max(atol, FLOAT32_ERROR_FACTOR * own)}


def token_row(backend: str, graph: str, output: str, logits64, logits32, tokens, atol: float) -> dict:
    """A token output's row: the fraction of tokens that are not transformers' choice. A token counts as its choice
    when its float64 logit is within the float error allowed (as for float outputs) of the largest one: float32
    transformers itself may pick either of two tokens that close."""
    allowed = max(atol, FLOAT32_ERROR_FACTOR * compare(logits64, logits32))
    best = logits64.max(axis=-1)
    chosen = np.take_along_axis(logits64, np.asarray(tokens)[..., None], axis=-1)[..., 0]
    wrong = chosen < best - 2 * allowed * (1 + np.abs(best))
    return {"backend": backend, "graph": graph, "output": output, "diff": float(np.mean(wrong)), "bound": 0.0}


def sample_row(backend: str, graph: str, logits64, temperature, uniform, sampled) -> dict:
    return {"backend": backend, "graph": graph, "output": "sampled",
            "diff": samples_outside_interval(logits64, temperature, uniform, sampled), "bound": 0.0}


def step_rows(backend: str, graph: str, expected64: dict, expected32: dict, actual: dict, temperature, uniform,
              atol: float) -> list[dict]:
    """Rows for a denoising step's (or the head's) outputs, each judged in its own way."""
    rows = []
    for name, value in actual.items():
        if name == "argmax":
            rows.append(token_row(backend, graph, name, expected64["logits"], expected32["logits"], value, atol))
        elif name == "sampled":
            rows.append(sample_row(backend, graph, expected64["logits"], temperature, uniform, value))
        else:
            rows.append(float_row(backend, graph, name, expected64[name], expected32[name], value, atol))
    return rows


def mark_ok(rows: list[dict]) -> list[dict]:
    for row in rows:
        row["ok"] = bool(row["diff"] <= row["bound"])
    return rows


def samples_outside_interval(logits: np.ndarray, temperature: np.ndarray, uniform: np.ndarray,
                             sampled: np.ndarray) -> float:
    """The fraction of sampled tokens whose interval of the reference CDF (float64) does not hold the uniform.

    An inverse-CDF sample is only defined up to the rounding of the CDF: a float32 running sum over V terms is off by
    about sqrt(V) float32 ulps, and a uniform that close to an interval's edge may fall either side (torch sums in
    float64, ONNX Runtime and OpenVINO in float32). The edges are widened by 4 sqrt(V) ulps of 1.0 for that.
    """
    vocab = logits.shape[-1]
    slack = 4 * np.sqrt(vocab) * 2.0**-24
    flat_logits, flat_u, flat_s = logits.reshape(-1, vocab), uniform.reshape(-1), sampled.reshape(-1)
    outside = 0
    for row, u, s in zip(flat_logits, flat_u, flat_s):  # a row at a time: float64 over the vocabulary is large
        z = row.astype(np.float64) / float(temperature)
        p = np.exp(z - z.max())
        cdf = np.cumsum(p / p.sum())
        low, high = cdf[s] - p[s] / p.sum(), (cdf[s] if s < vocab - 1 else 1.0)
        outside += not (low - slack <= u < high + slack)
    return outside / flat_u.size


def float64_twin(model):
    """transformers' model in float64 (its grouped_mm experts have no float64 kernel: the eager loop is exact).
    transformers still rounds a few steps through float32 there (norms, softmaxes, the logits), so this reference
    is about 2^-24 relative from exact at those steps, below float32's accumulated error."""
    twin = copy.deepcopy(model).double()
    twin.set_experts_implementation("eager")
    return twin


def reference_run(model, prompt, chunk, canvas_ids, sc_logits, positions, temperature, uniform) -> dict:
    """What every graph output must be, from transformers' `model` (float32 or float64) on the validation inputs."""
    dtype = next(model.parameters()).dtype
    cache = DynamicCache(config=model.config.text_config)
    run = {"next logits after prompt": reference.encode(model, cache, prompt, 0),
           "KV after prompt": [a.copy() for a in reference.cache_arrays(cache)]}
    run["next logits after next chunk"] = reference.encode(model, cache, chunk, prompt.shape[1])
    run["KV after next chunk"] = reference.cache_arrays(cache)
    sc = sc_logits.astype(np.float64 if dtype == torch.float64 else np.float32)
    run["step"] = reference.denoise(model, cache, canvas_ids, sc, positions, temperature, uniform)
    return run


def validate(model, folder, manifest: dict, backends: list[str], atol: float, batch: int = 2,
             prompt_length: int | None = None, chunk_length: int = 5, seed: int = 0) -> list[dict]:
    """Rows of (backend, graph, output, difference, bound, ok); every row must be ok for the export to pass.

    By default the prompt is 3 tokens longer than the sliding window; the chunk stands for a committed block.
    The reference is transformers' model with the weights the artifact stores (rounded to fp16 for an fp16
    artifact), so that the comparison measures the graphs, not the storage precision.
    """
    if manifest["precision"] == "fp16":
        model = copy.deepcopy(model)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.ndim > 1:  # what the exporter stores narrower; norms and scales stay fp32
                    parameter.copy_(parameter.half().float())
    text = model.config.text_config
    canvas = model.config.canvas_length
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, text.vocab_size, (batch, prompt_length or text.sliding_window + 3))
    chunk = rng.integers(0, text.vocab_size, (batch, chunk_length))
    start = prompt.shape[1] + chunk.shape[1]
    canvas_ids = rng.integers(0, text.vocab_size, (batch, canvas))
    positions = np.broadcast_to(np.arange(start, start + canvas), (batch, canvas)).copy()
    sc_logits = rng.normal(0, 3, (batch, canvas, text.vocab_size)).astype(np.float32)
    uniform = rng.random((batch, canvas), dtype=np.float32)
    temperature = np.array(0.7, dtype=np.float32)
    inputs = (prompt, chunk, canvas_ids, sc_logits, positions, temperature, uniform)
    want32, want64 = reference_run(model, *inputs), reference_run(float64_twin(model), *inputs)
    soft = reference.soft_embedding(model, torch.from_numpy(sc_logits)).numpy()

    rows = []
    for backend in backends:
        # The graphs' own fidelity, in f32, whatever precision the recipe asks the runtime to compute in.
        graph = ModelGraph(open_graph(folder, manifest, backend, precision="f32"), text.hidden_size)
        kv = graph.new_cache(manifest["model"]["kv_layout"], text.sliding_window, batch)  # OpenVINO state, or host
        for ids, label in ((prompt, "prompt"), (chunk, "next chunk")):
            next_token = graph.encode(kv, ids)
            rows.append(float_row(backend, "encoder", f"KV after {label}", want64[f"KV after {label}"],
                                  want32[f"KV after {label}"], list(kv.tensors), atol))
            rows.append(token_row(backend, "encoder", f"next token after {label}", want64[f"next logits after {label}"],
                                  want32[f"next logits after {label}"], next_token, atol))
        names = [name for name in want64["step"] if name in graph.session.output_names]  # a large head: no logits
        actual = dict(zip(names, graph.run(names, graph.denoiser_feeds(kv, canvas_ids, soft, positions, temperature,
                                                                         uniform))))
        rows += step_rows(backend, "denoiser", want64["step"], want32["step"], actual, temperature, uniform, atol)
    if "vision" in manifest:
        rows += vision_rows(model, folder, manifest, backends, atol, rng)
    return mark_ok(rows)


def vision_rows(model, folder, manifest: dict, backends: list[str], atol: float, rng) -> list[dict]:
    """The vision graph against transformers' vision tower and embedder (`get_image_features`) on random pixels:
    an image of 2 x 3 pooled blocks of patches."""
    v = manifest["vision"]
    rows, columns = 2 * v["pooling_kernel"], 3 * v["pooling_kernel"]
    pixels = rng.random((1, rows * columns, 3 * v["patch_size"] ** 2), dtype=np.float32)
    column, row = np.meshgrid(np.arange(columns), np.arange(rows), indexing="xy")
    positions = np.stack([column.ravel(), row.ravel()], axis=1)[None].astype(np.int64)
    expected = []
    for reference_model in (float64_twin(model), model):
        with torch.no_grad():
            dtype = next(reference_model.parameters()).dtype
            expected.append(reference_model.model.encoder.get_image_features(
                torch.from_numpy(pixels).to(dtype), torch.from_numpy(positions)).pooler_output.numpy())
    found = []
    for backend in backends:
        session = open_graph(folder, manifest, backend, precision="f32", graph="vision")
        (features,) = session.run(["image_features"], {"pixel_values": pixels, "pixel_positions": positions})
        found.append(float_row(backend, "vision", "image_features", *expected, features[0], atol))
    return found


# --- by layer: for checkpoints too large to hold, one layer's reference and graphs at a time ------------------

class ComponentWeights:
    """One component's tensors, read back from the artifact's weights file and shared without copies by
    transformers' module (as views in its own layout) and by both backends (fed as inputs to a copy of the
    component graph whose weights are inputs)."""

    def __init__(self, model: onnx.ModelProto, folder: Path):
        from .weights import HALVES

        self.arrays, self.sources, halves = {}, {}, {}
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                array = read_stored(tensor, folder)
                self.arrays[tensor.name] = array
                source, _, layout = re.sub(r"\[\d+:\d+\]$", "", tensor.name).rpartition(".")
                if layout in HALVES:  # gate and up stored apart: transformers' module takes them stacked
                    halves.setdefault(source, {})[layout] = array
                elif layout == "linear":
                    self.sources[source] = (array, True)
                else:
                    self.sources[f"{source}.{layout}"] = (array, False)
        for source, parts in halves.items():
            self.sources[source] = (np.concatenate([parts[h] for h in HALVES], axis=-2), False)

    def torch(self, source: str, dtype=torch.float32) -> torch.Tensor:
        """The tensor in transformers' layout (a view when it is stored transposed and float32)."""
        array, linear = self.sources[source]
        tensor = torch.from_numpy(array.astype(torch.empty((), dtype=dtype).numpy().dtype, copy=False))
        return tensor.transpose(-1, -2) if linear else tensor


def read_stored(tensor: onnx.TensorProto, folder: Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """An initializer's array from the weights file, or rows [start, stop) of its first axis."""
    from .weights import NUMPY_TYPES, external_location

    dtype = NUMPY_TYPES[tensor.data_type]
    file, offset, length = external_location(tensor)
    dims = list(tensor.dims)
    if not dims:
        return np.fromfile(Path(folder) / file, dtype=dtype, count=1, offset=offset).reshape(())
    row_items = int(np.prod(dims[1:]))
    stop = dims[0] if stop is None else stop
    return np.fromfile(Path(folder) / file, dtype=dtype, count=(stop - start) * row_items,
                       offset=offset + start * row_items * np.dtype(dtype).itemsize).reshape([stop - start, *dims[1:]])


def check_weights_file(checkpoint, weights, folder: Path) -> float:
    """The fraction of tensors the weights file does not hold as the checkpoint does: floats exactly (at the
    stored precision), quantized ones within half a quantization step once dequantized. Compared a chunk of rows
    at a time (a 2-D matrix stored transposed, whole), in float64, so that no rounding of the check decides it.

    The quantizer computes round(w / scale) in float32: the quotient may be off by one rounding (2^-24 of it)
    before it is rounded to the grid, so a value exactly half a step from two grid points may land on either, and
    be half a step plus 2^-24 |w| away. That much is allowed (2^-23 |w|), no more."""
    from .checkpoint import row_chunks
    from .weights import NUMPY_TYPES, decode, layout_rows, transposed

    mismatched = 0
    for (source, layout), locations in weights.locations.items():
        scheme, name = weights.schemes[source], weights.resolve(source)
        parts = {part: location.proto() for part, location in locations.items()}
        whole = transposed(layout, scheme) and len(parts["weight"].dims) == 2
        for start, stop in row_chunks(checkpoint.shape(name), whole=whole):
            stored, tolerance = decode({part: read_stored(t, folder, start, stop) for part, t in parts.items()},
                                       scheme, layout)
            expected = layout_rows(layout, checkpoint.read(name, start, stop))
            if not scheme.quantized:
                expected = expected.astype(NUMPY_TYPES[parts["weight"].data_type])
            expected = expected.astype(np.float64)
            if not np.all(np.abs(stored - expected) <= tolerance + 2.0**-23 * np.abs(expected) * scheme.quantized):
                mismatched += 1
                break
    return mismatched / max(1, len(weights.locations))


def weights_row(checkpoint, weights, folder: Path) -> dict:
    return {"backend": "-", "graph": "weights file", "output": "tensors unlike the checkpoint",
            "diff": check_weights_file(checkpoint, weights, folder), "bound": 0.0}


def validate_by_layer(config, checkpoint, folder, weights, backends: list[str], atol: float, batch: int = 2,
                      new_tokens: int = 5, seed: int = 0, progress=None, target: str = "onnx",
                      moe: str = "sorted", images: bool = False) -> list[dict]:
    """Each component of the graphs, built by the same builder functions from the same weights, against
    transformers' own module: every encoder and decoder layer (with a past longer than the sliding window would
    keep), the canvas embedding with self-conditioning, and the head. One component's weights are in memory at a
    time, once: read back from the weights file and checked against the checkpoint, they feed transformers'
    module and both backends. (The weights are graph inputs here; the artifact's graphs, where they are
    constants in the weights file, are what the full validation of small checkpoints checks.)
    """
    from transformers.models.diffusion_gemma import modeling_diffusion_gemma as hf

    from . import builder

    text = copy.deepcopy(config.text_config)
    text._attn_implementation = "eager"
    text._experts_implementation = "eager"  # grouped_mm has no float64 kernel; the eager loop is as exact
    full_shape = builder.ModelShape(config)
    rng = np.random.default_rng(seed)
    rotary = hf.DiffusionGemmaTextRotaryEmbedding(text)
    rows = [weights_row(checkpoint, weights, Path(folder))]
    if progress is not None:
        progress.update(1)

    def check(name: str, graph: builder.Graph, feeds: dict, reference):
        """`reference(tensor, dtype)`: transformers' module on the feeds, run in float32 and in float64."""
        model = graph.model()
        tensors = ComponentWeights(model, Path(folder))
        expected32, expected64 = (reference(lambda source: tensors.torch(source, dtype), dtype)
                                  for dtype in (torch.float32, torch.float64))
        for backend in backends:
            names = list(expected32)
            outputs = run_component(model, backend, {**feeds, **tensors.arrays}, names, Path(folder),
                                    constant_weights=backend == "openvino" and moe == "tiled")
            rows.extend(step_rows(backend, name, expected64, expected32, dict(zip(names, outputs)),
                                  feeds.get("temperature"), feeds.get("sample_uniform"), atol))
        if progress is not None:
            progress.update(1)

    # Each layer is checked with a sample of its experts (a rotating range of EXPERT_SAMPLE, its router rows and
    # per-expert scales: transformers' layer built for that many experts), the embedding and the head with a sample
    # of the vocabulary; the byte check above covers every tensor.
    sample = min(text.num_experts, max(text.top_k_experts, EXPERT_SAMPLE))
    vocab = (0, min(text.vocab_size, VOCAB_SAMPLE))
    text.vocab_size, text.num_experts = vocab[1], sample  # transformers' modules are built for the samples
    past_lengths = {"sliding_attention": text.sliding_window - 1, "full_attention": text.sliding_window + 3}
    for i, layer_type in enumerate(text.layer_types):
        first = i * sample % full_shape.num_experts if full_shape.num_experts % sample == 0 else 0
        shape = full_shape.sample(experts=(first, first + sample), vocab=vocab)
        layout = shape.layout[i]
        past = past_lengths[layer_type]
        hidden = rng.standard_normal((batch, new_tokens, text.hidden_size)).astype(np.float32)
        positions = np.broadcast_to(np.arange(past, past + new_tokens), (batch, new_tokens)).copy()
        past_key, past_value = (rng.standard_normal((batch, layout["kv_heads"], past, layout["head_dim"]))
                                .astype(np.float32) for _ in range(2))
        for side in ("encoder", "decoder"):
            g = builder.Graph(f"{side}.layers.{i}", weights, target, moe)
            x, pos, pk, pv = (g.add_input(e) for e in layer_io(text, layout))
            rope = builder.rotary_emb(g, pos, shape.inv_freq[layer_type], layer_type)
            mask = None
            if side == "encoder":
                mask = builder.causal_mask(g, pos, pk, text.sliding_window if layer_type == "sliding_attention" else None)
            prefix = shape.encoder_layers_prefix if side == "encoder" else shape.layers_prefix
            out, key, value = builder.text_layer(g, x, i, shape, rope, pk, pv, mask,
                                                 g.weight(f"{prefix}.{i}.layer_scalar"))
            for value_name, entry in zip((out, key, value), output_io(text, layout)[:3 if side == "encoder" else 1]):
                g.add_output(value_name, entry)
            check(f"{side}.layers.{i}", g, {"hidden_states": hidden, "position_ids": positions, "past_key": past_key,
                                             "past_value": past_value},
                  lambda tensor, dtype: reference_layer(hf, text, tensor, dtype, rotary, i, side, hidden, positions,
                                                        past_key, past_value))

    shape = full_shape.sample(vocab=vocab)
    canvas = config.canvas_length
    canvas_ids = rng.integers(0, text.vocab_size, (batch, canvas))
    soft = rng.standard_normal((batch, canvas, text.hidden_size)).astype(np.float32)
    g = builder.Graph("canvas_embedding", weights, target, moe)
    ids = g.add_input({"name": "canvas_ids", "dtype": "int64", "shape": ["batch", canvas]})
    soft_in = g.add_input({"name": "soft_embedding", "dtype": "float32", "shape": ["batch", canvas, text.hidden_size]})
    g.add_output(builder.canvas_embedding(g, builder.embed_tokens(g, ids, shape), soft_in, shape),
                 {"name": "hidden_states", "dtype": "float32", "shape": ["batch", canvas, text.hidden_size]})
    check("canvas_embedding", g, {"canvas_ids": canvas_ids, "soft_embedding": soft},
          lambda tensor, dtype: {"hidden_states": reference_canvas_embedding(hf, text, tensor, dtype, canvas_ids, soft)})

    # The head works position by position: a few rows check it as well as a canvas, with a fraction of the
    # vocabulary-sized temporaries.
    rows_checked = min(canvas, 16)
    hidden = rng.standard_normal((1, rows_checked, text.hidden_size)).astype(np.float32)
    temperature, uniform = np.array(0.7, dtype=np.float32), rng.random((1, rows_checked), dtype=np.float32)
    g = builder.Graph("head", weights, target, moe)
    x = g.add_input({"name": "hidden_states", "dtype": "float32", "shape": ["batch", "rows", text.hidden_size]})
    t = g.add_input({"name": "temperature", "dtype": "float32", "shape": []})
    u = g.add_input({"name": "sample_uniform", "dtype": "float32", "shape": ["batch", "rows"]})
    spec = [{**e, "shape": ["batch", "rows", *([shape.vocab] if e["name"] == "logits" else e["shape"][2:])]}
            for e in builder.graph_specs(config, logits=True)["model"]["outputs"] if not e["name"].startswith("present.")]
    outputs = builder.denoiser_head(g, x, t, u, shape)
    for entry in spec:
        g.add_output(outputs[entry["name"]], entry)
    check("head", g, {"hidden_states": hidden, "temperature": temperature, "sample_uniform": uniform},
          lambda tensor, dtype: reference_head(hf, text, tensor, dtype, shape.lm_head, hidden, temperature, uniform))
    if images:
        check_vision_components(check, config, weights, target, rng)
    return mark_ok(rows)


def check_vision_components(check, config, weights, target: str, rng) -> None:
    """The vision graph's components against transformers' modules, on a grid of 2 x 3 pooled blocks: the patch
    embedder, each encoder layer, and the pooler with the standardization and the embedder."""
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import DiffusionGemmaMultimodalEmbedder
    from transformers.models.gemma4 import modeling_gemma4 as hf

    from . import builder, vision

    v, settings = vision.VisionShape(config), copy.deepcopy(config.vision_config)
    settings._attn_implementation = "eager"
    rows, columns = 2 * v.kernel, 3 * v.kernel
    column, row = np.meshgrid(np.arange(columns), np.arange(rows), indexing="xy")
    positions = np.stack([column.ravel(), row.ravel()], axis=1)[None].astype(np.int64)
    pixels = rng.random((1, rows * columns, 3 * v.patch_size ** 2), dtype=np.float32)
    hidden = rng.standard_normal((1, rows * columns, v.hidden)).astype(np.float32)
    patches = {"name": "pixel_positions", "dtype": "int64", "shape": [1, "patches", 2]}
    states = {"name": "hidden_states", "dtype": "float32", "shape": [1, "patches", v.hidden]}

    def loaded(module, prefix: str, tensor, dtype):
        """transformers' `module` with the artifact's weights, in `dtype`."""
        module = module.to(dtype)
        module.load_state_dict({name: tensor(f"{prefix}.{name}") for name in module.state_dict()
                                if name.split(".")[-1] not in ("inv_freq", "original_inv_freq")}, strict=False)
        return module

    def component(name: str, inputs: list[dict], build, feeds: dict, reference, output: dict = states) -> None:
        g = builder.Graph(name, weights, target)
        g.add_output(build(g, *(g.add_input(e) for e in inputs)), {**output, "name": "output"})
        check(name, g, feeds, lambda tensor, dtype: {"output": reference(tensor, dtype).detach().numpy()})

    no_padding = torch.zeros(positions.shape[:2], dtype=torch.bool)
    component("vision.patch_embedder", [{"name": "pixel_values", "dtype": "float32", "shape": [1, "patches", pixels.shape[-1]]}, patches],
              lambda g, x, pos: vision.patch_embedder(g, x, pos, v), {"pixel_values": pixels, "pixel_positions": positions},
              lambda tensor, dtype: loaded(hf.Gemma4VisionPatchEmbedder(settings), f"{vision.TOWER}.patch_embedder",
                                           tensor, dtype)(torch.from_numpy(pixels).to(dtype),
                                                          torch.from_numpy(positions), no_padding))
    rotary = hf.Gemma4VisionRotaryEmbedding(settings)
    for i in range(v.layers):
        def layer(tensor, dtype, i=i):
            x = torch.from_numpy(hidden).to(dtype)
            module = loaded(hf.Gemma4VisionEncoderLayer(settings, i), f"{vision.TOWER}.encoder.layers.{i}", tensor, dtype)
            rope = rotary(x, torch.from_numpy(positions))
            return module(x, position_embeddings=rope, attention_mask=None, position_ids=torch.from_numpy(positions))

        component(f"vision.encoder.layers.{i}", [states, patches],
                  lambda g, x, pos, i=i: vision.encoder_layer(g, x, i, vision.rotary_emb(g, pos, v), v),
                  {"hidden_states": hidden, "pixel_positions": positions}, layer)

    def pooled(g, x, pos):
        x = vision.pooler(g, x, pos, v)
        if v.standardize:
            x = g.op("Mul", g.op("Sub", x, g.weight(f"{vision.TOWER}.std_bias")), g.weight(f"{vision.TOWER}.std_scale"))
        return vision.embed_vision(g, x, v)

    def pooled_reference(tensor, dtype):
        x, _ = hf.Gemma4VisionPooler(settings)(torch.from_numpy(hidden).to(dtype), torch.from_numpy(positions),
                                               no_padding, output_length=hidden.shape[1] // v.kernel ** 2)
        x = x.to(dtype)
        if v.standardize:
            x = (x - tensor(f"{vision.TOWER}.std_bias")) * tensor(f"{vision.TOWER}.std_scale")
        embedder = DiffusionGemmaMultimodalEmbedder(settings, config.text_config)
        return loaded(embedder, vision.EMBEDDER, tensor, dtype)(x)

    component("vision.pooler+embed_vision", [states, patches], pooled, {"hidden_states": hidden,
                                                                       "pixel_positions": positions}, pooled_reference,
              {**states, "shape": [1, "image_tokens", v.text_hidden]})


def component_count(config, images: bool = False) -> int:
    return 2 * config.text_config.num_hidden_layers + 3 + (config.vision_config.num_hidden_layers + 2 if images else 0)


def layer_io(text, layout) -> list[dict]:
    kv = ["batch", layout["kv_heads"], "past", layout["head_dim"]]
    return [{"name": "hidden_states", "dtype": "float32", "shape": ["batch", "new_tokens", text.hidden_size]},
            {"name": "position_ids", "dtype": "int64", "shape": ["batch", "new_tokens"]},
            {"name": "past_key", "dtype": "float32", "shape": kv}, {"name": "past_value", "dtype": "float32", "shape": kv}]


def output_io(text, layout) -> list[dict]:
    kv = ["batch", layout["kv_heads"], "new_tokens", layout["head_dim"]]
    return [{"name": "layer_output", "dtype": "float32", "shape": ["batch", "new_tokens", text.hidden_size]},
            {"name": "key", "dtype": "float32", "shape": kv}, {"name": "value", "dtype": "float32", "shape": kv}]


def run_component(model: onnx.ModelProto, backend: str, feeds: dict, outputs: list[str], scratch: Path,
                  constant_weights: bool = False):
    """Run a component graph with its weights as inputs (the arrays in `feeds` are used in place), or, with
    `constant_weights` (`scratch` is then the artifact folder), as the weights file's bytes it points at: OpenVINO
    compiles a tiled MoE block only over constant weights."""
    from .weights import weights_as_inputs

    twin = model if constant_weights else weights_as_inputs(model)[0]
    if constant_weights:
        feeds = {name: value for name, value in feeds.items() if name in {i.name for i in model.graph.input}}
    path = scratch / f".validate-{model.graph.name}.onnx"
    onnx.save(twin, str(path))
    try:
        if backend == "onnxruntime":
            import onnxruntime as ort

            return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(outputs, feeds)
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled.create_infer_request().infer(feeds, share_inputs=True)
        return [result[compiled.output(name)] for name in outputs]
    finally:
        path.unlink()


def load_module(make, tensor, dtype, prefix: str, overrides: dict | None = None):
    """A transformers module built on the meta device and given the component's tensors under `prefix`, in `dtype`
    (its non-persistent buffers too)."""
    with torch.device("meta"):
        module = make()
    state = {name: tensor((overrides or {}).get(name, f"{prefix}.{name}")) for name in module.state_dict()}
    module.load_state_dict(state, strict=False, assign=True)
    return module.to(dtype).eval()


@torch.no_grad()
def reference_layer(hf, text, tensor, dtype, rotary, i, side, hidden, positions, past_key, past_value) -> dict:
    """transformers' encoder or decoder layer `i` on explicit inputs, the past given through a DynamicCache."""
    layer_class = hf.DiffusionGemmaEncoderTextLayer if side == "encoder" else hf.DiffusionGemmaDecoderTextLayer
    scalar = f"model.{'encoder.language_model' if side == 'encoder' else 'decoder'}.layers.{i}.layer_scalar"
    layer = load_module(lambda: layer_class(text, i), tensor, dtype, f"model.decoder.layers.{i}",
                        {"layer_scalar": scalar})
    cache = DynamicCache(config=text)
    for j, layer_type in enumerate(text.layer_types):  # other layers only need the right lengths for the masks
        if j == i:
            cache.update(torch.from_numpy(past_key).to(dtype), torch.from_numpy(past_value).to(dtype), j)
        elif layer_type == text.layer_types[i]:
            empty = torch.zeros(*past_key.shape[:2], 0, past_key.shape[3], dtype=dtype)
            cache.update(empty, empty, j)
    x, pos = torch.from_numpy(hidden).to(dtype), torch.from_numpy(positions)
    layer_type = text.layer_types[i]
    if side == "encoder":
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        make = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
        mask = make(config=text, inputs_embeds=x, attention_mask=None, cache=cache, position_ids=pos, layer_idx=i)
    else:
        mask = hf.DiffusionGemmaDecoderModel.create_diffusion_decoder_attention_mask(text, x, cache)[layer_type]
    out = layer(x, position_embeddings=rotary(x, pos, layer_type), attention_mask=mask, position_ids=pos, cache=cache)
    expected = {"layer_output": out.numpy()}
    if side == "encoder":  # the new tokens' KV are the last entries the cache keeps
        expected["key"] = cache.layers[i].keys[:, :, -hidden.shape[1]:].numpy()
        expected["value"] = cache.layers[i].values[:, :, -hidden.shape[1]:].numpy()
    return expected


@torch.no_grad()
def reference_canvas_embedding(hf, text, tensor, dtype, canvas_ids, soft) -> np.ndarray:
    embed = load_module(lambda: hf.DiffusionGemmaTextScaledWordEmbedding(
        text.vocab_size, text.hidden_size, text.pad_token_id, embed_scale=text.hidden_size**0.5),
        tensor, dtype, "model.decoder.embed_tokens")
    embed.embed_scale = torch.tensor(text.hidden_size**0.5, dtype=dtype)  # a non-persistent buffer: not stored
    block = load_module(lambda: hf.DiffusionGemmaSelfConditioning(text), tensor, dtype,
                        "model.decoder.self_conditioning")
    return block(embed(torch.from_numpy(canvas_ids)), torch.from_numpy(soft).to(dtype)).numpy()


@torch.no_grad()
def reference_head(hf, text, tensor, dtype, lm_head: str, hidden, temperature, uniform) -> dict:
    """transformers' final norm, lm_head and softcap, then the same step outputs the full validation checks."""
    norm = load_module(lambda: hf.DiffusionGemmaRMSNorm(text.hidden_size, eps=text.rms_norm_eps), tensor, dtype,
                       "model.decoder.norm")
    logits = torch.nn.functional.linear(norm(torch.from_numpy(hidden).to(dtype)), tensor(lm_head))
    logits = torch.tanh(logits / text.final_logit_softcapping) * text.final_logit_softcapping
    return reference.step_outputs(logits, tensor("model.decoder.embed_tokens.weight"), text.hidden_size**0.5,
                                  temperature, uniform)
