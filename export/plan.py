"""`dg-export --dry-run`: the export plan from the config alone, with no weights loaded or downloaded.

The model is instantiated on the meta device, so parameter counts come from transformers' own modules and the
26B shape is planned in seconds and well under 2 GB.
"""

import numpy as np
import torch

from .graphs import graph_specs, kv_layout

GB = 1e9
# Measured here (2 cores; python bench/benchmark_export.py): the exporter process with its libraries loaded,
# memory per byte of what validation holds, and throughputs.
PROCESS_BYTES = 0.55e9
FULL_VALIDATION_BUDGET = 4e9
FULL_VALIDATION_FACTOR = 5.5
VOCAB_TEMPORARIES = 16
COMPONENT_FACTOR = 2.5
FIXED_SECONDS = 5.0
STREAM_BYTES_PER_S = 250e6
FULL_VALIDATION_BYTES_PER_S = 50e6
BY_LAYER_BYTES_PER_S = 320e6
COMPONENT_SECONDS = 0.25


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


def tower_shapes(config) -> dict[str, tuple]:
    """The checkpoint tensors of the vision tower and its embedder, with their shapes."""
    from dg_quantize.roles import role_of

    from .weights import expected_shapes

    return {name: shape for name, shape in expected_shapes(config, images=True).items() if role_of(name) == "vision"}


def vision_parameters(config) -> dict:
    """The vision tower's and embedder's parameters: all, and those a patch multiplies (its matrices, less the
    position table and the embedder, which runs once per soft token)."""
    counts = {"total": 0, "per_patch": 0, "per_token": 0}
    for name, shape in tower_shapes(config).items():
        size = int(np.prod(shape))
        counts["total"] += size
        if "embed_vision" in name:
            counts["per_token"] += size
        elif len(shape) == 2:
            counts["per_patch"] += size
    return counts


def export_estimate(config, counts: dict, validation: str = "auto") -> dict:
    """dg-export's peak memory and time for this shape, from the sizes that drive them and the rates and overheads
    measured here (python bench/benchmark_export.py prints measured peaks beside these).

    Streaming holds one chunk (or one 2-D matrix, which is transposed whole) as read, widened and laid out. Full
    validation holds transformers' fp32 model (loaded through a state dict), both backends' sessions (with their
    repacked weights) and a step's vocabulary-sized tensors for a batch of 2; by-layer validation holds one component's weights once (a layer with a sample of its experts,
    or a sample of the embedding rows). `auto` validates in full when that fits FULL_VALIDATION_BUDGET.
    """
    from .validate import EXPERT_SAMPLE, VOCAB_SAMPLE
    from .checkpoint import CHUNK_BYTES

    text = config.text_config
    fp32 = 4 * counts["total"]
    largest_matrix = max(text.hidden_size * max(text.num_attention_heads * layer["head_dim"], text.intermediate_size)
                         for layer in kv_layout(text))
    largest_tensor = 4 * max(text.vocab_size * text.hidden_size, counts["experts"] / text.num_hidden_layers / 3 * 2)
    stream = max(4 * min(CHUNK_BYTES, largest_tensor), largest_matrix * 10)  # read, widened, laid out, written
    sample = min(text.num_experts, max(text.top_k_experts, EXPERT_SAMPLE)) / text.num_experts
    per_layer_experts = counts["experts"] / text.num_hidden_layers
    per_layer_rest = (counts["total"] - counts["experts"] - counts["embedding"]) / text.num_hidden_layers
    component = 4 * max(per_layer_rest + sample * per_layer_experts, min(text.vocab_size, VOCAB_SAMPLE) * text.hidden_size)
    full = FULL_VALIDATION_FACTOR * fp32 + VOCAB_TEMPORARIES * 2 * config.canvas_length * text.vocab_size * 4
    if validation == "auto":
        validation = "full" if PROCESS_BYTES + full <= FULL_VALIDATION_BUDGET else "by-layer"
    validate = full if validation == "full" else COMPONENT_FACTOR * component
    seconds = FIXED_SECONDS + fp32 / STREAM_BYTES_PER_S + (fp32 / FULL_VALIDATION_BYTES_PER_S if validation == "full" else
                                           fp32 / BY_LAYER_BYTES_PER_S + COMPONENT_SECONDS * (2 * text.num_hidden_layers + 2))
    return {"validation": validation, "stream_gb": (PROCESS_BYTES + stream) / GB,
            "validate_gb": (PROCESS_BYTES + validate) / GB,
            "peak_gb": (PROCESS_BYTES + max(stream, validate)) / GB, "minutes": seconds / 60, "write_gb": fp32 / GB}


def recipe_sizes(config) -> list[tuple[str, int, str]]:
    """(recipe, weights bytes, precision by role) for every built-in recipe, from the tensor shapes alone."""
    from dg_quantize.roles import Precision

    from .recipes import available, load_recipe
    from .synthetic import text_tensor_shapes
    from .weights import stored_size

    shapes = text_tensor_shapes(config)
    rows = []
    for name in available():
        precision = Precision(load_recipe(name)["weights"])
        size = sum(stored_size(shape, precision.scheme(source, shape)) for source, shape in shapes.items())
        rows.append((name, size, precision.label()))
    return rows


def tower_sizes(config) -> dict[str, int]:
    """The vision tower's stored bytes at each format --vision-weight-format offers."""
    from dg_quantize.roles import VISION_FORMATS, Precision

    from .weights import stored_size

    shapes, sizes = tower_shapes(config), {}
    for format_ in VISION_FORMATS:
        precision = Precision("fp32", vision=format_)
        sizes[format_] = sum(stored_size(shape, precision.scheme(name, shape)) for name, shape in shapes.items())
    return sizes


def kv_bytes_per_token(config) -> tuple[float, float]:
    """fp32 KV bytes per cached token in full layers, and the fixed cost of the sliding layers' window."""
    layers = kv_layout(config.text_config)
    per = [2 * layer["kv_heads"] * layer["head_dim"] * 4 for layer in layers]
    full = sum(b for b, layer in zip(per, layers) if layer["type"] == "full_attention")
    sliding = sum(b for b, layer in zip(per, layers) if layer["type"] == "sliding_attention")
    return full, sliding * (config.text_config.sliding_window - 1)


def format_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def print_plan(config, model_name: str, formats: list[str], declares_vision: bool = True) -> None:
    """`declares_vision`: config.json has a vision_config (without one transformers builds its default tower)."""
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
    print("  weights per recipe (stored once, shared by both modes and formats):")
    for name, size, label in recipe_sizes(config):
        print(f"    {name:20} {size / GB:7.1f} GB  {label}")
    full_kv, sliding_kv = kv_bytes_per_token(config)
    print(f"  runtime KV cache (fp32): {full_kv / 1e6:.3f} MB per token in full layers + {sliding_kv / 1e6:.1f} MB "
          f"for the sliding windows")
    step_flops = 2 * counts["active_per_token"] * canvas
    print(f"  denoiser step: ~{step_flops / 1e12:.2f} TFLOP per canvas of {canvas} (matmuls, excluding attention)")
    if config.vision_config is not None:
        vision, tokens = vision_parameters(config), 280  # transformers' processor's default budget
        patches = tokens * config.vision_config.pooling_kernel_size ** 2
        flops = 2 * (vision["per_patch"] * patches + vision["per_token"] * tokens)
        sizes = ", ".join(f"{size / GB:.2f} GB {format_}" for format_, size in tower_sizes(config).items())
        default = "" if declares_vision else "transformers' default, config.json declares none; "
        print(f"  vision tower ({default}graph `vision`, exported when the checkpoint holds it; fp32 unless "
              f"--vision-weight-format): {vision['total'] / 1e6:.0f} M parameters, {sizes}; an image of {tokens} "
              f"tokens ({patches} patches): ~{flops / 1e12:.2f} TFLOP (matmuls, excluding attention)")
    estimate = export_estimate(config, counts)
    print(f"  export ({', '.join(formats)}; weights streamed one chunk at a time, {estimate['validation']} "
          f"validation):")
    print(f"    peak memory ~{estimate['peak_gb']:.1f} GB (streaming ~{estimate['stream_gb']:.1f} GB, validation "
          f"~{estimate['validate_gb']:.1f} GB); time ~{estimate['minutes']:.0f} min at the rates measured on a 2-core "
          f"machine, most of it writing {estimate['write_gb']:.0f} GB of fp32 weights")
