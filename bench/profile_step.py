"""Where one denoising step of the 26B's widths goes, component by component, on both backends, beside this CPU's
ceiling for the kernel each component runs.

    python bench/profile_step.py [--layers 6] [--recipe cpu-int4-mixed] [--steps 5] [--backends onnxruntime,openvino]
                                 [--precision f32|bf16] [--fresh]

The stand-in has the published config's widths, heads, 128 experts top-8 and 262,144-token vocabulary, and the
first `--layers` of its layer pattern (6: one unit, 5 sliding + 1 full), with seeded random weights streamed
into the recipe's artifact once (kept in the cache). Per backend, in a fresh process: load, prefill a
1,000-token prompt, run the runtime's warm-up steps, then profile `--steps` denoising steps with the backend's
own per-node timer (ONNX Runtime's profiler, OpenVINO's PERF_COUNT) and sort node time into components by the
builder's scopes (`layers.N/experts/...`). "host" is the wall time of a step's graph call not spent in nodes (feeds,
outputs, the framework), "loop" the runtime's numpy work between graph calls. Each matmul component's GOP/s is set
beside the best this backend reaches on the same GEMM shape alone, with int8 and int4 weights and in float (ONNX
Runtime: fp32, OpenVINO: bf16 on AMX) measured in the same run. The 30-layer step is extrapolated from the layers'
times (sliding and full layers scaled separately). `--fresh` exports the stand-in again (after exporter changes).
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "diffusiongemma-26b-a4b-it"
PROMPT_TOKENS = 1000
MATMULS = {"MatMulNBits", "DynamicQuantizeMatMul", "MatMul", "Gemm", "MatMulInteger", "FullyConnected",
           "FullyConnected_compressed", "GatherMatmul"}
COMPONENTS = ["experts (matmuls)", "experts (sort, split, GeGLU, scatter)", "router", "attention projections",
              "attention (rope, norms, scores, softmax)", "dense MLP", "norms and residuals", "canvas embedding",
              "LM head", "softmax, entropy, sampling", "soft embedding", "masks, rotary, outputs"]


def component(name: str, op: str) -> str:
    """The component a node belongs to, from the builder's scope in its name (ONNX node name or OpenVINO's
    friendly name) and its kind."""
    matmul = op in MATMULS or "FullyConnected" in op or "matmul" in op.lower()
    scope = name.split("/")
    if scope[0] == "head":  # ONNX Runtime's large head: a Loop whose body nodes carry head/<module>/...
        scope = scope[1:] if len(scope) > 2 else ["layers.final", "norm"]
    if scope[0].startswith("layers."):
        part = scope[1] if len(scope) > 2 else ""
        if part == "experts":
            return "experts (matmuls)" if matmul else "experts (sort, split, GeGLU, scatter)"
        if part == "router":
            return "router"
        if part == "self_attn":
            weighted = op in ("DynamicQuantizeMatMul", "MatMulNBits") or "FullyConnected" in op
            return "attention projections" if weighted else "attention (rope, norms, scores, softmax)"
        if part == "mlp":
            return "dense MLP"
        return "norms and residuals"
    if scope[0] in ("embed_tokens", "self_conditioning"):
        return "canvas embedding"
    if scope[0] == "lm_head":
        return "LM head"
    if scope[0] == "sampling_head":
        return "soft embedding" if matmul else "softmax, entropy, sampling"
    return "masks, rotary, outputs"


def component_gops(config, past: int) -> dict[str, float]:
    """GOP a denoising step spends in each matmul component (2 x rows x in x out per product; attention scores
    and values over `past` cached keys plus the canvas)."""
    from dg_export.weights import expected_shapes

    text, rows = config.text_config, config.canvas_length
    gops = dict.fromkeys(COMPONENTS, 0.0)
    for name, shape in expected_shapes(config).items():
        if not name.startswith("model.decoder.") or len(shape) < 2:
            continue
        size = float(np.prod(shape[-2:]))
        if ".experts." in name:
            gops["experts (matmuls)"] += 2 * rows * text.top_k_experts * size / 1e9
        elif ".self_attn." in name and name.endswith("_proj.weight"):
            gops["attention projections"] += 2 * rows * size / 1e9
        elif ".mlp." in name:
            gops["dense MLP"] += 2 * rows * size / 1e9
        elif ".router." in name:
            gops["router"] += 2 * rows * size / 1e9
        elif "self_conditioning" in name:
            gops["canvas embedding"] += 2 * rows * size / 1e9
        elif "embed_tokens" in name:
            gops["LM head"] += 2 * rows * size / 1e9
            gops["soft embedding"] += 2 * rows * size / 1e9
    for index, layer_type in enumerate(text.layer_types):
        full = layer_type == "full_attention"
        head_dim = text.per_layer_config[index].head_dim
        keys = rows + (past if full else min(past, text.sliding_window - 1))
        gops["attention (rope, norms, scores, softmax)"] += 2 * 2 * text.num_attention_heads * rows * keys * head_dim / 1e9
    return gops


def standin(layers: int, recipe: str, fresh: bool = False) -> Path:
    """The real-width stand-in's artifact, exported once into the cache (again if `fresh`)."""
    from dg_export import export
    from dg_export.builtin import cache_dir
    from dg_export.synthetic import standin_config, write_config

    published = json.loads((FIXTURE / "config.json").read_text())["text_config"]
    folder = cache_dir() / f"profile-{layers}-layers"
    artifact = cache_dir() / f"profile-{layers}-layers-{recipe}.dg"
    if fresh or not (artifact / "manifest.json").is_file():
        write_config(folder, standin_config(FIXTURE / "config.json", {
            "num_hidden_layers": layers, "layer_types": published["layer_types"][:layers]}))
        export(f"synthetic:{folder}", artifact, recipe=recipe, overwrite=True, validation=None)
    return artifact


def profile(artifact: str, backend: str, steps: int, precision: str | None = None) -> dict:
    """In a fresh process: per-component milliseconds of a denoising step (median over `steps`), per layer, the
    host's share of a graph call and the loop's numpy time per step."""
    from dg_runtime import load
    from dg_runtime.graph import STEP_OUTPUTS, WARMUP_RUNS

    model = load(artifact, backend=backend, memory_upkeep=True)
    rng = np.random.default_rng(0)
    cache = model.new_cache(1)
    model.graph.encode(cache, rng.integers(3, model.vocab_size, (1, PROMPT_TOKENS)))
    loop = loop_ms(model, cache.copy(), WARMUP_RUNS + steps)

    shape = (1, model.canvas_length)
    feeds = model.graph.denoiser_feeds(
        cache, rng.integers(0, model.vocab_size, shape), rng.standard_normal((*shape, model.hidden_size), np.float32),
        np.arange(cache.length, cache.length + shape[1])[None], np.array(0.7, np.float32),
        rng.random(shape, dtype=np.float32))
    model.graph.session = None  # one copy of the weights at a time
    session = OrtProfiled(model) if backend == "onnxruntime" else OvProfiled(model, precision)
    for _ in range(WARMUP_RUNS):
        session.run(STEP_OUTPUTS, feeds)
    walls = []
    for _ in range(steps):
        started = time.perf_counter()
        session.run(STEP_OUTPUTS, feeds)
        walls.append((time.perf_counter() - started) * 1000)
    components, layers, steps_nodes = [], [], session.node_times(steps)
    for nodes in steps_nodes:  # one {node name: (op, ms)} per profiled step
        by_component, by_layer = dict.fromkeys(COMPONENTS, 0.0), {}
        for name, (op, ms) in nodes.items():
            if op == "Loop":  # its body's nodes are timed one by one
                continue
            by_component[component(name, op)] += ms
            if name.startswith("layers."):
                by_layer[name.split("/")[0]] = by_layer.get(name.split("/")[0], 0.0) + ms
        components.append(by_component)
        layers.append(by_layer)
    times = {c: statistics.median(step[c] for step in components) for c in COMPONENTS}
    wall = statistics.median(walls)
    times["host"] = max(wall - sum(times.values()), 0.0)
    times["loop"] = loop
    top = sorted(steps_nodes[-1].items(), key=lambda item: -item[1][1])[:20]
    return {"components": times, "wall_ms": wall, "layer_types": model.manifest["model"]["layer_types"],
            "top_nodes": [(name, op, round(ms, 2)) for name, (op, ms) in top],
            "layers": {name: statistics.median(step.get(name, 0.0) for step in layers) for name in layers[0]}}


class Timed:
    """A graph session that times its calls."""

    def __init__(self, session):
        self.session, self.output_names, self.seconds = session, session.output_names, []

    def run(self, outputs, feeds):
        started = time.perf_counter()
        results = self.session.run(outputs, feeds)
        self.seconds.append(time.perf_counter() - started)
        return results


def loop_ms(model, cache, steps: int) -> float:
    """The runtime's own time per denoising step outside the graph call (sampler, noise, numpy), after warm-up."""
    timed = model.graph.session = Timed(model.graph.session)
    settings = model.defaults.with_overrides(max_new_tokens=model.canvas_length, max_denoising_steps=steps,
                                             stability_threshold=steps)  # no early stop: every step runs
    marks = [time.perf_counter() for event in model.stream([[5]], cache=cache, settings=settings, seed=0)
             if type(event).__name__ == "Draft"]
    model.graph.session = timed.session
    step_walls = np.diff(marks)[-4:]
    return max(float(np.median(step_walls) - np.median(timed.seconds[-4:])) * 1000, 0.0)


class OrtProfiled:
    """The artifact's ONNX graph in a session with ONNX Runtime's profiler on (the runtime's own has it off)."""

    def __init__(self, model):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
        options.log_severity_level = 3
        graph = model.folder / model.manifest["formats"]["onnx"]["graphs"]["model"]
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def run(self, outputs, feeds):
        return self.session.run(outputs, feeds)

    def node_times(self, last: int) -> list[dict]:
        events = json.loads(Path(self.session.end_profiling()).read_text())
        runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-last:]
        nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        steps = []
        for run in runs:
            step = {}
            for event in nodes:
                if run["ts"] <= event["ts"] <= run["ts"] + run["dur"]:
                    name = event["name"].removesuffix("_kernel_time")
                    op, ms = event.get("args", {}).get("op_name", ""), event["dur"] / 1000
                    step[name] = (op, step.get(name, (op, 0.0))[1] + ms)
            steps.append(step)
        return steps


class OvProfiled:
    """The artifact's OpenVINO IR compiled with PERF_COUNT on; each run's per-node times kept."""

    def __init__(self, model, precision: str | None):
        import openvino as ov

        entry = model.manifest["formats"]["openvino"]
        core = ov.Core()
        ir = core.read_model(str(model.folder / entry["graphs"]["model"]), str(model.folder / entry["weights"]))
        precision = precision or model.manifest["openvino"]["inference_precision"]
        config = {"PERF_COUNT": "YES", "INFERENCE_PRECISION_HINT": precision}
        self.request = core.compile_model(ir, "CPU", config).create_infer_request()
        self.steps = []

    def run(self, outputs, feeds):
        self.request.infer(feeds)
        self.steps.append({info.node_name: (info.node_type, info.real_time.total_seconds() * 1000)
                           for info in self.request.profiling_info})
        return [self.request.get_tensor(name).data.copy() for name in outputs]

    def node_times(self, last: int) -> list[dict]:
        return self.steps[-last:]


# --- this CPU's ceiling: the components' GEMM shapes alone --------------------------------------------------------

def gemm_shapes(config) -> dict[str, tuple[int, int, int, int]]:
    """(count, rows, in, out) of the matmul each component runs, as one graph of `count` independent products: an
    expert gets rows x top-k / experts tokens, 32 experts side by side (alone, one would measure call overhead);
    the head's width is cut to 32,768 columns (its GOP/s is what counts)."""
    text, rows = config.text_config, config.canvas_length
    per_expert = rows * text.top_k_experts // text.num_experts
    return {"experts (matmuls)": (32, per_expert, text.hidden_size, 2 * text.moe_intermediate_size),
            "attention projections": (1, rows, text.hidden_size,
                                      text.num_attention_heads * text.per_layer_config[0].head_dim),
            "dense MLP": (1, rows, text.hidden_size, text.intermediate_size),
            "LM head": (1, rows, text.hidden_size, min(text.vocab_size, 32768))}


def gemm_graph(kernel: str, count: int, rows: int, columns: int, out: int, target: str, group: int = 64):
    """`count` independent [rows, columns] x [columns, out] products with random weights, in the form the exporter
    writes for `kernel` on `target` (onnx: ONNX Runtime's kernels; openvino: OpenVINO's compressed pattern)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for i in range(count):
        x, y = f"x{i}", f"y{i}"
        if kernel in ("fp32", "bf16"):
            inits.append(numpy_helper.from_array(rng.standard_normal((columns, out), np.float32), f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
        elif kernel == "int8":
            inits += [numpy_helper.from_array(rng.integers(-127, 128, (columns, out), dtype=np.int8), f"w{i}"),
                      numpy_helper.from_array(rng.random((1, out), np.float32) / 100, f"s{i}")]
            if target == "onnx":
                nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, f"w{i}", f"s{i}"], [y], domain="com.microsoft"))
            else:
                nodes += [helper.make_node("Cast", [f"w{i}"], [f"wf{i}"], to=TensorProto.FLOAT),
                          helper.make_node("Mul", [f"wf{i}", f"s{i}"], [f"ws{i}"]),
                          helper.make_node("MatMul", [x, f"ws{i}"], [y])]
        else:  # int4, symmetric, groups of `group` input channels
            blocks = columns // group
            scale = (rng.random((out * blocks,)) / 100).astype(np.float16)
            if target == "onnx":
                packed = rng.integers(0, 256, (out, blocks, group // 2), dtype=np.uint8)
                inits += [numpy_helper.from_array(packed, f"w{i}"), numpy_helper.from_array(scale, f"s{i}")]
                nodes += [helper.make_node("Cast", [x], [f"xh{i}"], to=TensorProto.FLOAT16),
                          helper.make_node("MatMulNBits", [f"xh{i}", f"w{i}", f"s{i}"], [f"yh{i}"], domain="com.microsoft",
                                           K=columns, N=out, bits=4, block_size=group, accuracy_level=4),
                          helper.make_node("Cast", [f"yh{i}"], [y], to=TensorProto.FLOAT)]
            else:
                values = rng.integers(0, 16, (out, blocks, group), dtype=np.uint8)
                inits += [helper.make_tensor(f"w{i}", TensorProto.UINT4, values.shape, values.flatten().tolist()),
                          numpy_helper.from_array(scale.reshape(out, blocks, 1), f"s{i}"),
                          helper.make_tensor(f"z{i}", TensorProto.UINT4, [1, 1, 1], [8]),
                          numpy_helper.from_array(np.array([out, columns], np.int64), f"shape{i}")]
                nodes += [helper.make_node("Cast", [f"w{i}"], [f"wh{i}"], to=TensorProto.FLOAT16),
                          helper.make_node("Cast", [f"z{i}"], [f"zh{i}"], to=TensorProto.FLOAT16),
                          helper.make_node("Sub", [f"wh{i}", f"zh{i}"], [f"wc{i}"]),
                          helper.make_node("Mul", [f"wc{i}", f"s{i}"], [f"ws{i}"]),
                          helper.make_node("Reshape", [f"ws{i}", f"shape{i}"], [f"wr{i}"]),
                          helper.make_node("Cast", [f"wr{i}"], [f"wf{i}"], to=TensorProto.FLOAT),
                          helper.make_node("Transpose", [f"wf{i}"], [f"wt{i}"], perm=[1, 0]),
                          helper.make_node("MatMul", [x, f"wt{i}"], [y])]
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [rows, out]))
    inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [rows, columns]) for i in range(count)]
    graph = helper.make_graph(nodes, "gemm", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


KERNELS = {"onnxruntime": ("int8", "int4", "fp32"), "openvino": ("int8", "int4", "bf16")}


def ceilings(backend: str, config) -> dict[str, dict[str, float]]:
    """GOP/s of each component's GEMM shape alone, per kernel, on `backend` (the best of 7 runs)."""
    import onnx

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (count, rows, columns, out) in gemm_shapes(config).items():
            results[name] = {}
            for kernel in KERNELS[backend]:
                group = 64 if columns % 128 else 128
                model = gemm_graph(kernel, count, rows, columns, out, "onnx" if backend == "onnxruntime" else "openvino",
                                   group)
                path = Path(scratch) / f"{name.split()[0]}-{kernel}.onnx"
                onnx.save(model, str(path))
                run = session(path, backend, kernel)
                feeds = {f"x{i}": np.random.default_rng(i).standard_normal((rows, columns), np.float32)
                         for i in range(count)}
                for _ in range(2):
                    run(feeds)
                seconds = []
                for _ in range(7):
                    started = time.perf_counter()
                    run(feeds)
                    seconds.append(time.perf_counter() - started)
                results[name][kernel] = 2 * count * rows * columns * out / min(seconds) / 1e9  # the best run
    return results


def session(path: Path, backend: str, kernel: str):
    if backend == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        inference = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda feeds: inference.run(None, feeds)
    import openvino as ov

    core = ov.Core()
    precision = "bf16" if kernel == "bf16" else "f32"
    request = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    infer = request.create_infer_request()
    return lambda feeds: infer.infer(feeds)


# --- the report ----------------------------------------------------------------------------------------------------

def worker(artifact: str, backend: str, steps: int, precision: str | None) -> dict:
    from dg_export.source import load_config

    figures = profile(artifact, backend, steps, precision)
    figures["ceilings"] = ceilings(backend, load_config(Path(artifact)))
    return figures


def extrapolate(figures: dict, config) -> float:
    """The 30-layer step: the profiled layers' times per layer type, times the published pattern's counts."""
    published = json.loads((FIXTURE / "config.json").read_text())["text_config"]["layer_types"]
    by_type: dict[str, list[float]] = {}
    for index, layer_type in enumerate(figures["layer_types"]):
        by_type.setdefault(layer_type, []).append(figures["layers"].get(f"layers.{index}", 0.0))
    layer_ms = sum(figures["layers"].values())
    rest = sum(figures["components"].values()) - layer_ms
    return rest + sum(statistics.mean(by_type[t]) for t in published if t in by_type)


def report(results: dict, config, past: int) -> None:
    gops = component_gops(config, past)
    backends = list(results)
    print(f"\nOne denoising step (canvas {config.canvas_length}, {PROMPT_TOKENS} cached tokens), "
          f"{config.text_config.num_hidden_layers} layers of the 26B's widths; ms per step (median), achieved GOP/s, "
          "and this CPU's GOP/s on the same GEMM shape alone per kernel\n")
    header = "| component | GOP |" + "".join(f" {b} ms | {b} GOP/s | {b} ceiling ({' / '.join(KERNELS[b])}) |"
                                              for b in backends)
    print(header)
    print("|---|---:|" + "---:|---:|---|" * len(backends))
    for name in [*COMPONENTS, "host", "loop"]:
        cells = []
        for b in backends:
            ms = results[b]["components"][name]
            rate = gops.get(name, 0.0) / (ms / 1000) if ms > 0 and gops.get(name) else None
            ceiling = results[b]["ceilings"].get(name)
            cells += [f"{ms:.1f}", f"{rate:.0f}" if rate else "",
                      " / ".join(f"{ceiling[k]:.0f}" for k in KERNELS[b]) if ceiling else ""]
        print(f"| {name} | {gops.get(name, 0.0):.1f} | " + " | ".join(cells) + " |")
    totals = [f"{sum(results[b]['components'].values()):.0f} (graph call {results[b]['wall_ms']:.0f})" for b in backends]
    print("| **step** | | " + " | | | ".join(totals) + " | | |")
    for b in backends:
        print(f"\n{b}: 30-layer step extrapolated from these layers: {extrapolate(results[b], config) / 1000:.2f} s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/profile_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--recipe", default="cpu-int4-mixed")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backends", default="onnxruntime,openvino")
    parser.add_argument("--precision", choices=["f32", "bf16"], help="OpenVINO's inference precision (default: the "
                        "artifact's)")
    parser.add_argument("--fresh", action="store_true", help="export the stand-in again")
    parser.add_argument("--worker", nargs=3, metavar=("ARTIFACT", "BACKEND", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]), args.precision)))
        return
    from dg_export.source import load_config

    artifact = standin(args.layers, args.recipe, args.fresh)
    results = {}
    for backend in args.backends.split(","):
        print(f"profiling {backend} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--worker", str(artifact), backend, str(args.steps),
                               *(["--precision", args.precision] if args.precision else [])],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{backend} failed:\n{done.stderr[-3000:]}")
        results[backend] = json.loads(done.stdout.strip().splitlines()[-1])
    report(results, load_config(artifact), PROMPT_TOKENS)


if __name__ == "__main__":
    main()
