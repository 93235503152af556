"""`dg-export --dry-run`: the export plan from the config alone, with no weights loaded or downloaded.

The model is instantiated on the meta device, so parameter counts come from transformers' own modules and the
26B shape is planned in seconds and well under 2 GB.
"""

import torch

from .graphs import graph_specs, kv_layout

BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0 + 2 / 128, "int4": 0.5 + 2 / 128}  # + group-128 scales
GB = 1e9


def count_parameters(config) -> dict:
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)
    seen, counts = set(), {"total": 0, "experts": 0, "embedding": 0}
    for name, param in model.named_parameters():  # tied parameters are listed once
        if "vision" in name or id(param) in seen:
            continue
        seen.add(id(param))
        counts["total"] += param.numel()
        if ".experts." in name:
            counts["experts"] += param.numel()
        if "embed_tokens" in name:
            counts["embedding"] += param.numel()
    text = config.text_config
    counts["active_per_token"] = counts["total"] - counts["experts"] * (1 - text.top_k_experts / text.num_experts)
    return counts


def kv_bytes_per_token(config) -> tuple[float, float]:
    """fp32 KV bytes per cached token in full layers, and the fixed cost of the sliding layers' window."""
    layers = kv_layout(config.text_config)
    per = [2 * layer["kv_heads"] * layer["head_dim"] * 4 for layer in layers]
    full = sum(b for b, layer in zip(per, layers) if layer["type"] == "full_attention")
    sliding = sum(b for b, layer in zip(per, layers) if layer["type"] == "sliding_attention")
    return full, sliding * (config.text_config.sliding_window - 1)


def format_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def print_plan(config, model_name: str, formats: list[str]) -> None:
    text = config.text_config
    counts = count_parameters(config)
    specs = graph_specs(config)
    canvas = config.canvas_length
    print(f"Plan for {model_name} (text path; dry run, no weights read)")
    print(f"  layers {text.num_hidden_layers} ({text.layer_types.count('sliding_attention')} sliding, window "
          f"{text.sliding_window}; {text.layer_types.count('full_attention')} full), hidden {text.hidden_size}, "
          f"vocab {text.vocab_size}, experts {text.num_experts} top-{text.top_k_experts}, canvas {canvas}")
    print(f"  parameters: {counts['total'] / 1e9:.2f} B unique ({counts['experts'] / 1e9:.2f} B in experts, "
          f"{counts['embedding'] / 1e9:.2f} B tied embedding), {counts['active_per_token'] / 1e9:.2f} B active per token")
    for graph, spec in specs.items():
        print(f"  graph {graph}:")
        for kind in ("inputs", "outputs"):
            entries = spec[kind]
            kv = [e for e in entries if e["name"].startswith(("past.", "present."))]
            for e in entries:
                if e not in kv:
                    print(f"    {kind[:-1]:6} {e['name']:20} {e['dtype']:8} {format_shape(e['shape'])}")
            if kv:
                print(f"    {kind[:-1]:6} {kv[0]['name'].split('.')[0]}.{{0..{text.num_hidden_layers - 1}}}.{{key,value}}"
                      f" float32 (sliding: {format_shape(kv[0]['shape'])}, full: {format_shape(kv[-1]['shape'])})")
    print("  artifact size per format (weights stored once, shared by both graphs):")
    for precision, per_weight in BYTES_PER_WEIGHT.items():
        print(f"    {precision:5} {counts['total'] * per_weight / GB:8.1f} GB")
    full_kv, sliding_kv = kv_bytes_per_token(config)
    print(f"  runtime KV cache (fp32): {full_kv / 1e6:.3f} MB per token in full layers + {sliding_kv / 1e6:.1f} MB "
          f"for the sliding windows")
    step_flops = 2 * counts["active_per_token"] * canvas
    print(f"  denoiser step: ~{step_flops / 1e12:.2f} TFLOP per canvas of {canvas} (matmuls, excluding attention)")
    fp32 = counts["total"] * 4
    print(f"  peak export memory with this exporter: ~{2 * fp32 / GB:.1f} GB (fp32 model + one graph's weights "
          f"while they are written); formats: {', '.join(formats)}")
