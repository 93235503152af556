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


def graph_specs(config, logits: bool | None = None) -> dict:
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
    """
    text = config.text_config
    layout = kv_layout(text)
    if logits is None:
        logits = not large_head(config)
    hidden, vocab = text.hidden_size, text.vocab_size
    return {
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
