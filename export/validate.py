"""Export-time validation: transformers and the exported graphs on the same random inputs.

The prompt is longer than the sliding window and is followed by a second chunk, so the sliding-window cache,
the causal window inside the encoder and the denoiser's view of a trimmed cache are all exercised.
"""

import numpy as np
import torch
from transformers import DynamicCache

from dg_runtime.backends import open_graph
from dg_runtime.kv_cache import KVCache

from . import reference

INTEGER_OUTPUTS = ("argmax", "sampled")


def compare(expected: np.ndarray, actual: np.ndarray) -> float:
    """Max abs difference for floats; the fraction of differing entries for token outputs."""
    if expected.dtype.kind in "iu":
        return float(np.mean(expected != actual))
    return float(np.max(np.abs(expected.astype(np.float64) - actual)))


def validate(model, folder, manifest: dict, backends: list[str], atol: float, batch: int = 2,
             prompt_length: int | None = None, chunk_length: int = 5, seed: int = 0) -> list[dict]:
    """Rows of (backend, graph, output, difference, ok); every row must be ok for the export to pass.

    By default the prompt is 3 tokens longer than the sliding window; the chunk stands for a committed block.
    """
    text = model.config.text_config
    canvas = model.config.canvas_length
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, text.vocab_size, (batch, prompt_length or text.sliding_window + 3))
    chunk = rng.integers(0, text.vocab_size, (batch, chunk_length))

    cache = DynamicCache(config=text)
    reference.encode(model, cache, prompt, 0)
    after_prompt = [a.copy() for a in reference.cache_arrays(cache)]
    reference.encode(model, cache, chunk, prompt.shape[1])
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
        encoder = open_graph(folder, manifest, "encoder", backend, precision="f32")
        denoiser = open_graph(folder, manifest, "denoiser", backend, precision="f32")
        kv = KVCache(manifest["model"]["kv_layout"], text.sliding_window, batch)
        for ids, want, label in ((prompt, after_prompt, "prompt"), (chunk, after_chunk, "next chunk")):
            positions_new = np.broadcast_to(np.arange(kv.length, kv.length + ids.shape[1]), ids.shape).copy()
            presents = encoder.run(encoder.output_names, {"input_ids": ids, "position_ids": positions_new, **kv.feeds()})
            kv.append(presents)
            diff = max(compare(w, t) for w, t in zip(want, kv.tensors))
            rows.append({"backend": backend, "graph": "encoder", "output": f"KV after {label}", "diff": diff})
        names = list(expected)
        feeds = {"canvas_ids": canvas_ids, "soft_embedding": soft, "position_ids": positions,
                 "temperature": temperature, "sample_uniform": uniform, **kv.feeds()}
        for name, actual in zip(names, denoiser.run(names, feeds)):
            rows.append({"backend": backend, "graph": "denoiser", "output": name, "diff": compare(expected[name], actual)})
    for row in rows:
        row["ok"] = row["diff"] == 0 if row["output"] in INTEGER_OUTPUTS else row["diff"] <= atol
    return rows
