"""The two graphs' interfaces, derived from the model config alone.

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


def _kv_tensors(layout, prefix: str, length_axis) -> list[dict]:
    tensors = []
    for i, layer in enumerate(layout):
        axis = length_axis or ("past_sliding" if layer["type"] == "sliding_attention" else "past_full")
        for kind in ("key", "value"):
            shape = ["batch", layer["kv_heads"], axis, layer["head_dim"]]
            tensors.append({"name": f"{prefix}.{i}.{kind}", "dtype": "float32", "shape": shape})
    return tensors


def graph_specs(config) -> dict:
    text = config.text_config
    layout = kv_layout(text)
    canvas, hidden, vocab = config.canvas_length, text.hidden_size, text.vocab_size
    past = _kv_tensors(layout, "past", None)
    return {
        "encoder": {
            "inputs": [
                {"name": "input_ids", "dtype": "int64", "shape": ["batch", "new_tokens"]},
                {"name": "position_ids", "dtype": "int64", "shape": ["batch", "new_tokens"]},
                *past,
            ],
            "outputs": _kv_tensors(layout, "present", "new_tokens"),
        },
        "denoiser": {
            "inputs": [
                {"name": "canvas_ids", "dtype": "int64", "shape": ["batch", canvas]},
                {"name": "soft_embedding", "dtype": "float32", "shape": ["batch", canvas, hidden]},
                {"name": "position_ids", "dtype": "int64", "shape": ["batch", canvas]},
                {"name": "temperature", "dtype": "float32", "shape": []},
                {"name": "sample_uniform", "dtype": "float32", "shape": ["batch", canvas]},
                *past,
            ],
            "outputs": [
                {"name": "argmax", "dtype": "int64", "shape": ["batch", canvas]},
                {"name": "sampled", "dtype": "int64", "shape": ["batch", canvas]},
                {"name": "entropy", "dtype": "float32", "shape": ["batch", canvas]},
                {"name": "next_soft_embedding", "dtype": "float32", "shape": ["batch", canvas, hidden]},
                {"name": "logits", "dtype": "float32", "shape": ["batch", canvas, vocab]},
            ],
        },
    }
