"""The graph's interface, derived from the model config alone.

One description serves the graph builder (input and output names, dtypes, symbolic shapes), the manifest
(which the runtime checks its sessions against) and `--dry-run`.
"""


def kv_layout(text_config) -> list[dict]:
    """Per layer: attention type, KV heads and head dim (full layers differ from sliding ones)."""
    return [
        {
            "type": layer_type,
            "kv_heads": text_config.per_layer_config[i].num_key_value_heads,
            "head_dim": text_config.per_layer_config[i].head_dim,
        }
        for i, layer_type in enumerate(text_config.layer_types)
    ]


# Bytes of one [canvas, vocab] float tensor above which the head is "large": its logits are no graph output (the
# runtime reads the head's argmax, samples, entropies and soft embedding; a 26B canvas' logits are 268 MB, which
# ONNX Runtime's looped head would gather from every chunk), and the ONNX head runs in chunks of rows.
LARGE_HEAD_BYTES = 64 << 20


def large_head(config) -> bool:
    return config.canvas_length * config.text_config.vocab_size * 4 > LARGE_HEAD_BYTES


def _kv_tensors(layout, prefix: str, length_axis) -> list[dict]:
    tensors = []
    for i, layer in enumerate(layout):
        axis = length_axis or ("past_sliding" if layer["type"] == "sliding_attention" else "past_full")
        for kind in ("key", "value"):
            shape = ["batch", layer["kv_heads"], axis, layer["head_dim"]]
            tensors.append({"name": f"{prefix}.{i}.{kind}", "dtype": "float32", "shape": shape})
    return tensors


def graph_specs(config, logits: bool | None = None, images: bool = False) -> dict:
    """The artifact's one graph. The encoder and the denoiser are the same layers with other masks, layer scalars and
    inputs, so one graph runs both and its weights are loaded once: `denoising` picks the mode.

    - encoding (denoising false): new tokens with a causal (and sliding-window) mask, the encoder's layer scalars;
      soft_embedding is one zero row, ignored.
    - denoising: the canvas, every position sees the cache and the whole canvas, the decoder's layer scalars, the
      previous step's soft embedding through self-conditioning.
    The head (final norm, LM head, sampling) reads the last `head_tokens` positions, as many as sample_uniform has:
    the whole canvas when denoising, the last token when encoding (its argmax is the autoregressive next token).
    The next soft embedding is computed only when denoising ([B, 0, H] otherwise). The logits are an output unless
    the head is large (`logits` None) or as asked.
    With `images`, the model graph also takes `image_features` (the vision graph's output for the image tokens
    among the new tokens; none: [0, hidden]), and the vision graph is listed.
    """
    text = config.text_config
    layout = kv_layout(text)
    if logits is None:
        logits = not large_head(config)
    hidden, vocab = text.hidden_size, text.vocab_size
    specs = {
        "model": {
            "inputs": [
                {"name": "input_ids", "dtype": "int64", "shape": ["batch", "tokens"]},
                {"name": "position_ids", "dtype": "int64", "shape": ["batch", "tokens"]},
                {"name": "soft_embedding", "dtype": "float32", "shape": ["batch", "soft_tokens", hidden]},
                {"name": "denoising", "dtype": "bool", "shape": []},
                {"name": "temperature", "dtype": "float32", "shape": []},
                {"name": "sample_uniform", "dtype": "float32", "shape": ["batch", "head_tokens"]},
                *_kv_tensors(layout, "past", None),
            ],
            "outputs": [
                *_kv_tensors(layout, "present", "tokens"),
                {"name": "argmax", "dtype": "int64", "shape": ["batch", "head_tokens"]},
                {"name": "sampled", "dtype": "int64", "shape": ["batch", "head_tokens"]},
                {"name": "entropy", "dtype": "float32", "shape": ["batch", "head_tokens"]},
                {"name": "next_soft_embedding", "dtype": "float32", "shape": ["batch", "soft_rows", hidden]},
                *([{"name": "logits", "dtype": "float32", "shape": ["batch", "head_tokens", vocab]}] if logits else []),
            ],
        },
    }
    if images:
        from .vision import vision_specs

        specs["model"]["inputs"].append({"name": "image_features", "dtype": "float32", "shape": ["image_tokens", hidden]})
        specs["vision"] = vision_specs(config)
    return specs


def static_shapes(config, static: dict) -> dict:
    """The fixed sizes of a static artifact (recipe `openvino.static`, for NPUs, whose plugin compiles static shapes
    only): one graph call takes `tokens` new tokens (the prompt chunk, and the canvas padded to it), at most
    `kv_capacity` cached tokens in full layers, and a sliding layer's window plus a canvas (fast mode's frozen
    positions join the past)."""
    tokens = max(static.get("prompt_chunk") or config.canvas_length, config.canvas_length)
    capacity = min(static.get("kv_capacity", 4096), config.text_config.max_position_embeddings)
    return {"batch": 1, "tokens": tokens, "soft_tokens": tokens, "head_tokens": tokens, "soft_rows": tokens,
            "past_full": capacity, "past_sliding": config.text_config.sliding_window - 1 + tokens}


def static_graph_specs(config, sizes: dict) -> dict:
    """graph_specs with every dimension fixed to `sizes`, and the counts that say how much of each padded input is
    real: `new_tokens` of the tokens, `past_full_length` and `past_sliding_length` of the cache slots."""
    specs = graph_specs(config)
    for entry in (e for spec in specs.values() for kind in ("inputs", "outputs") for e in spec[kind]):
        entry["shape"] = [sizes[d] if isinstance(d, str) else d for d in entry["shape"]]
    for spec in specs.values():
        spec["inputs"] += [{"name": name, "dtype": "int64", "shape": []}
                           for name in ("new_tokens", "past_full_length", "past_sliding_length")]
    return specs
