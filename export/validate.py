"""Export-time validation: transformers and the exported graphs on the same random inputs.

The prompt is longer than the sliding window and is followed by a second chunk, so the sliding-window cache,
the causal window inside the encoder and the denoiser's view of a trimmed cache are all exercised.
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
from dg_runtime.kv_cache import KVCache

from . import reference

INTEGER_OUTPUTS = ("argmax", "sampled", "tensors unlike the checkpoint", "next token after prompt",
                   "next token after next chunk")
EXPERT_SAMPLE = 16
VOCAB_SAMPLE = 16384


def compare(expected: np.ndarray, actual: np.ndarray) -> float:
    """For floats, the largest |actual - expected| / (1 + |expected|): an absolute difference for values up to
    about 1 and a relative one beyond (logits reach 30, entropies sum 262,144 terms); for token outputs, the
    fraction of differing entries."""
    if expected.dtype.kind in "iu":
        return float(np.mean(expected != actual))
    expected = expected.astype(np.float64)
    return float(np.max(np.abs(expected - actual) / (1 + np.abs(expected))))


def output_difference(name: str, expected: dict, actual: np.ndarray, temperature, uniform) -> float:
    """compare(), except that a sampled token is judged against transformers' CDF (samples_outside_interval)."""
    if name == "sampled":
        return samples_outside_interval(expected["logits"], temperature, uniform, actual)
    return compare(expected[name], actual)


def mark_ok(rows: list[dict], atol: float) -> list[dict]:
    for row in rows:
        row["ok"] = row["diff"] == 0 if row["output"] in INTEGER_OUTPUTS else row["diff"] <= atol
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


def validate(model, folder, manifest: dict, backends: list[str], atol: float, batch: int = 2,
             prompt_length: int | None = None, chunk_length: int = 5, seed: int = 0) -> list[dict]:
    """Rows of (backend, graph, output, difference, ok); every row must be ok for the export to pass.

    By default the prompt is 3 tokens longer than the sliding window; the chunk stands for a committed block.
    The reference is transformers' model with the weights the artifact stores (rounded to fp16 for an fp16
    artifact), so that the comparison measures the graphs, not the storage precision.
    """
    if manifest["precision"] == "fp16":
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.ndim > 1:  # what the exporter stores narrower; norms and scales stay fp32
                    parameter.copy_(parameter.half().float())
    text = model.config.text_config
    canvas = model.config.canvas_length
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, text.vocab_size, (batch, prompt_length or text.sliding_window + 3))
    chunk = rng.integers(0, text.vocab_size, (batch, chunk_length))

    cache = DynamicCache(config=text)
    next_after_prompt = reference.encode(model, cache, prompt, 0)
    after_prompt = [a.copy() for a in reference.cache_arrays(cache)]
    next_after_chunk = reference.encode(model, cache, chunk, prompt.shape[1])
    after_chunk = reference.cache_arrays(cache)

    start = prompt.shape[1] + chunk.shape[1]
    canvas_ids = rng.integers(0, text.vocab_size, (batch, canvas))
    positions = np.broadcast_to(np.arange(start, start + canvas), (batch, canvas)).copy()
    sc_logits = rng.normal(0, 3, (batch, canvas, text.vocab_size)).astype(np.float32)
    uniform = rng.random((batch, canvas), dtype=np.float32)
    temperature = np.array(0.7, dtype=np.float32)
    expected = reference.denoise(model, cache, canvas_ids, sc_logits, positions, temperature, uniform)
    soft = reference.soft_embedding(model, torch.from_numpy(sc_logits)).numpy()

    rows = []
    for backend in backends:
        # The graphs' own fidelity, in f32, whatever precision the recipe asks the runtime to compute in.
        graph = ModelGraph(open_graph(folder, manifest, backend, precision="f32"), text.hidden_size)
        kv = KVCache(manifest["model"]["kv_layout"], text.sliding_window, batch)
        for ids, want, want_next, label in ((prompt, after_prompt, next_after_prompt, "prompt"),
                                            (chunk, after_chunk, next_after_chunk, "next chunk")):
            next_token = graph.encode(kv, ids)
            diff = max(compare(w, t) for w, t in zip(want, kv.tensors))
            rows.append({"backend": backend, "graph": "encoder", "output": f"KV after {label}", "diff": diff})
            rows.append({"backend": backend, "graph": "encoder", "output": f"next token after {label}",
                         "diff": float(np.mean(next_token != want_next))})
        names = [name for name in expected if name in graph.session.output_names]  # a large head has no logits
        feeds = graph.denoiser_feeds(kv, canvas_ids, soft, positions, temperature, uniform)
        for name, actual in zip(names, graph.run(names, feeds)):
            diff = output_difference(name, expected, actual, temperature, uniform)
            rows.append({"backend": backend, "graph": "denoiser", "output": name, "diff": diff})
    return mark_ok(rows, atol)


# --- by layer: for checkpoints too large to hold, one layer's reference and graphs at a time ------------------

class ComponentWeights:
    """One component's tensors, read back from the artifact's weights file and shared without copies by
    transformers' module (as views in its own layout) and by both backends (fed as inputs to a copy of the
    component graph whose weights are inputs)."""

    def __init__(self, model: onnx.ModelProto, folder: Path):
        self.arrays, self.sources = {}, {}
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                array = read_stored(tensor, folder)
                self.arrays[tensor.name] = array
                source = re.sub(r"\[\d+:\d+\]$", "", tensor.name)
                self.sources[source.removesuffix(".linear")] = (array, source.endswith(".linear"))

    def torch(self, source: str) -> torch.Tensor:
        """The tensor in transformers' layout (a view when it is stored transposed)."""
        array, linear = self.sources[source]
        tensor = torch.from_numpy(array.astype(np.float32, copy=False))
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
    at a time (a 2-D matrix stored transposed, whole)."""
    from .checkpoint import row_chunks
    from .weights import NUMPY_TYPES, decode, transposed

    mismatched = 0
    for (source, layout), locations in weights.locations.items():
        scheme, name = weights.schemes[source], weights.resolve(source)
        parts = {part: location.proto() for part, location in locations.items()}
        whole = transposed(layout, scheme) and len(parts["weight"].dims) == 2
        for start, stop in row_chunks(checkpoint.shape(name), whole=whole):
            stored, tolerance = decode({part: read_stored(t, folder, start, stop) for part, t in parts.items()},
                                       scheme, layout)
            expected = checkpoint.read(name, start, stop)
            if not scheme.quantized:
                expected = expected.astype(NUMPY_TYPES[parts["weight"].data_type]).astype(np.float32)
            if not np.all(np.abs(stored - expected) <= tolerance * (1 + 1e-5) + 1e-30):
                mismatched += 1
                break
    return mismatched / max(1, len(weights.locations))


def validate_by_layer(config, checkpoint, folder, weights, backends: list[str], atol: float, batch: int = 2,
                      new_tokens: int = 5, seed: int = 0, progress=None) -> list[dict]:
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
    full_shape = builder.ModelShape(config)
    rng = np.random.default_rng(seed)
    rotary = hf.DiffusionGemmaTextRotaryEmbedding(text)
    rows = [{"backend": "-", "graph": "weights file", "output": "tensors unlike the checkpoint",
             "diff": check_weights_file(checkpoint, weights, Path(folder))}]
    if progress is not None:
        progress.update(1)

    def check(name: str, graph: builder.Graph, feeds: dict, reference):
        model = graph.model()
        tensors = ComponentWeights(model, Path(folder))
        expected = reference(tensors.torch)
        for backend in backends:
            outputs = run_component(model, backend, {**feeds, **tensors.arrays}, list(expected), Path(folder))
            for output, actual in zip(expected, outputs):
                diff = output_difference(output, expected, actual, feeds.get("temperature"), feeds.get("sample_uniform"))
                rows.append({"backend": backend, "graph": name, "output": output, "diff": diff})
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
            g = builder.Graph(f"{side}.layers.{i}", weights)
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
                  lambda tensor: reference_layer(hf, text, tensor, rotary, i, side, hidden, positions, past_key,
                                                 past_value))

    shape = full_shape.sample(vocab=vocab)
    canvas = config.canvas_length
    canvas_ids = rng.integers(0, text.vocab_size, (batch, canvas))
    soft = rng.standard_normal((batch, canvas, text.hidden_size)).astype(np.float32)
    g = builder.Graph("canvas_embedding", weights)
    ids = g.add_input({"name": "canvas_ids", "dtype": "int64", "shape": ["batch", canvas]})
    soft_in = g.add_input({"name": "soft_embedding", "dtype": "float32", "shape": ["batch", canvas, text.hidden_size]})
    g.add_output(builder.canvas_embedding(g, builder.embed_tokens(g, ids, shape), soft_in, shape),
                 {"name": "hidden_states", "dtype": "float32", "shape": ["batch", canvas, text.hidden_size]})
    check("canvas_embedding", g, {"canvas_ids": canvas_ids, "soft_embedding": soft},
          lambda tensor: {"hidden_states": reference_canvas_embedding(hf, text, tensor, canvas_ids, soft)})

    # The head works position by position: a few rows check it as well as a canvas, with a fraction of the
    # vocabulary-sized temporaries.
    rows_checked = min(canvas, 16)
    hidden = rng.standard_normal((1, rows_checked, text.hidden_size)).astype(np.float32)
    temperature, uniform = np.array(0.7, dtype=np.float32), rng.random((1, rows_checked), dtype=np.float32)
    g = builder.Graph("head", weights)
    x = g.add_input({"name": "hidden_states", "dtype": "float32", "shape": ["batch", "rows", text.hidden_size]})
    t = g.add_input({"name": "temperature", "dtype": "float32", "shape": []})
    u = g.add_input({"name": "sample_uniform", "dtype": "float32", "shape": ["batch", "rows"]})
    spec = [{**e, "shape": ["batch", "rows", *([shape.vocab] if e["name"] == "logits" else e["shape"][2:])]}
            for e in builder.graph_specs(config, logits=True)["model"]["outputs"] if not e["name"].startswith("present.")]
    outputs = builder.denoiser_head(g, x, t, u, shape)
    for entry in spec:
        g.add_output(outputs[entry["name"]], entry)
    check("head", g, {"hidden_states": hidden, "temperature": temperature, "sample_uniform": uniform},
          lambda tensor: reference_head(hf, text, tensor, shape.lm_head, hidden, temperature, uniform))
    return mark_ok(rows, atol)


def component_count(config) -> int:
    return 2 * config.text_config.num_hidden_layers + 3


def layer_io(text, layout) -> list[dict]:
    kv = ["batch", layout["kv_heads"], "past", layout["head_dim"]]
    return [{"name": "hidden_states", "dtype": "float32", "shape": ["batch", "new_tokens", text.hidden_size]},
            {"name": "position_ids", "dtype": "int64", "shape": ["batch", "new_tokens"]},
            {"name": "past_key", "dtype": "float32", "shape": kv}, {"name": "past_value", "dtype": "float32", "shape": kv}]


def output_io(text, layout) -> list[dict]:
    kv = ["batch", layout["kv_heads"], "new_tokens", layout["head_dim"]]
    return [{"name": "layer_output", "dtype": "float32", "shape": ["batch", "new_tokens", text.hidden_size]},
            {"name": "key", "dtype": "float32", "shape": kv}, {"name": "value", "dtype": "float32", "shape": kv}]


def run_component(model: onnx.ModelProto, backend: str, feeds: dict, outputs: list[str], scratch: Path):
    """Run a component graph with its weights as inputs (the arrays in `feeds` are used in place)."""
    from .weights import weights_as_inputs

    twin, _ = weights_as_inputs(model)
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


def load_module(make, tensor, prefix: str, overrides: dict | None = None):
    """A transformers module built on the meta device and given the component's tensors under `prefix`."""
    with torch.device("meta"):
        module = make()
    state = {name: tensor((overrides or {}).get(name, f"{prefix}.{name}")) for name in module.state_dict()}
    module.load_state_dict(state, strict=False, assign=True)
    return module.eval()


@torch.no_grad()
def reference_layer(hf, text, tensor, rotary, i, side, hidden, positions, past_key, past_value) -> dict:
    """transformers' encoder or decoder layer `i` on explicit inputs, the past given through a DynamicCache."""
    layer_class = hf.DiffusionGemmaEncoderTextLayer if side == "encoder" else hf.DiffusionGemmaDecoderTextLayer
    scalar = f"model.{'encoder.language_model' if side == 'encoder' else 'decoder'}.layers.{i}.layer_scalar"
    layer = load_module(lambda: layer_class(text, i), tensor, f"model.decoder.layers.{i}", {"layer_scalar": scalar})
    cache = DynamicCache(config=text)
    for j, layer_type in enumerate(text.layer_types):  # other layers only need the right lengths for the masks
        if j == i:
            cache.update(torch.from_numpy(past_key), torch.from_numpy(past_value), j)
        elif layer_type == text.layer_types[i]:
            empty = torch.zeros(*past_key.shape[:2], 0, past_key.shape[3])
            cache.update(empty, empty, j)
    x, pos = torch.from_numpy(hidden), torch.from_numpy(positions)
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
def reference_canvas_embedding(hf, text, tensor, canvas_ids, soft) -> np.ndarray:
    embed = load_module(lambda: hf.DiffusionGemmaTextScaledWordEmbedding(
        text.vocab_size, text.hidden_size, text.pad_token_id, embed_scale=text.hidden_size**0.5),
        tensor, "model.decoder.embed_tokens")
    embed.embed_scale = torch.tensor(text.hidden_size**0.5)  # a non-persistent buffer: not in the checkpoint
    block = load_module(lambda: hf.DiffusionGemmaSelfConditioning(text), tensor, "model.decoder.self_conditioning")
    return block(embed(torch.from_numpy(canvas_ids)), torch.from_numpy(soft)).numpy()


@torch.no_grad()
def reference_head(hf, text, tensor, lm_head: str, hidden, temperature, uniform) -> dict:
    """transformers' final norm, lm_head and softcap, then the same step outputs the full validation checks."""
    norm = load_module(lambda: hf.DiffusionGemmaRMSNorm(text.hidden_size, eps=text.rms_norm_eps), tensor,
                       "model.decoder.norm")
    logits = torch.nn.functional.linear(norm(torch.from_numpy(hidden)), tensor(lm_head)).float()
    logits = torch.tanh(logits / text.final_logit_softcapping) * text.final_logit_softcapping
    return reference.step_outputs(logits, tensor("model.decoder.embed_tokens.weight"), text.hidden_size**0.5,
                                  temperature, uniform)
