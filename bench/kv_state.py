"""The KV cache as OpenVINO state (recipe `openvino.kv_state`) against the stateless artifact: bytes moved between
the host and the backend, and time, per prompt encode and per denoising step, measured in the same run.

    python bench/kv_state.py [--model canvas256] [--prompt-tokens 256 1024 3072] [--steps 16] [--threads 2]

Exports the embedded model (default canvas256, the published canvas) with the `igpu-int4` recipe (its KV in state)
and with the same recipe with `kv_state` false, both cached; then, per prompt length (random tokens, seeded), each
artifact encodes the prompt and denoises one block for `--steps` steps (the stop rule off, so both run every step):
bytes moved per encode and per step (array feeds in, outputs out, KV written to or read from the state), the
median step time, and whether the two generated the same tokens. Last, the same bytes per step computed for the
26B's shape (tests/fixtures) at 1,000 and 4,000 cached tokens; nothing of it runs.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark import is_current  # noqa: E402

PUBLISHED = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "diffusiongemma-26b-a4b-it"


class Counting:
    """A graph session that adds up the bytes of each call's array feeds and outputs, and times its calls."""

    def __init__(self, session):
        self.session, self.input_names, self.output_names = session, session.input_names, session.output_names
        self.calls = []  # (denoising, bytes in, bytes out, seconds)

    def run(self, outputs, feeds):
        started = time.perf_counter()
        results = self.session.run(outputs, feeds)
        seconds = time.perf_counter() - started
        sent = sum(v.nbytes for v in feeds.values() if isinstance(v, np.ndarray))
        self.calls.append((bool(feeds["denoising"]), sent, sum(r.nbytes for r in results), seconds))
        return results


def artifacts(model: str) -> dict[str, Path]:
    from dg_export import export
    from dg_export.builtin import builtin_checkpoint, cache_dir
    from dg_export.recipes import load_recipe

    recipe = load_recipe("igpu-int4")
    stateless = cache_dir() / "bench-igpu-int4-stateless.json"
    stateless.write_text(json.dumps({**{k: v for k, v in recipe.items() if k != "name"},
                                     "openvino": {**recipe["openvino"], "kv_state": False}}))
    found = {}
    for kind, chosen in (("stateless", str(stateless)), ("state", "igpu-int4")):
        found[kind] = cache_dir() / f"bench-kv-{model}-{kind}.dg"
        if not is_current(found[kind], builtin_checkpoint(f"builtin:{model}")):
            export(f"builtin:{model}", found[kind], recipe=chosen, overwrite=True)
    return found


def measure(folder: Path, prompt: np.ndarray, steps: int, threads: int):
    from dg_runtime import Settings, load

    model = load(folder, backend="openvino", threads=threads)
    counting = model.graph.session = Counting(model.graph.session)
    state = counting.session if hasattr(counting.session, "moved_bytes") else None
    settings = Settings(max_new_tokens=model.canvas_length, max_denoising_steps=steps, confidence_threshold=0.0)
    model.generate(prompt, settings=settings, seed=1)  # warm-up: first runs pack the weights
    counting.calls.clear()
    moved = state.moved_bytes if state else 0
    tokens = model.generate(prompt, settings=settings, seed=1).tokens
    encodes = [c for c in counting.calls if not c[0]]
    denoises = [c for c in counting.calls if c[0]]
    return {"encode": sum(c[1] + c[2] for c in encodes), "step": statistics.mean(c[1] + c[2] for c in denoises),
            "state": (state.moved_bytes - moved) if state else 0, "step_ms": statistics.median(c[3] for c in denoises) * 1000,
            "steps": len(denoises), "tokens": tokens}


def published_bytes(cached: int) -> tuple[int, int]:
    """(the KV a stateless denoising step sends, the canvas's own inputs and outputs) in bytes, on the 26B's shape."""
    from dg_export.graphs import kv_layout
    from dg_export.source import load_config

    config = load_config(PUBLISHED)
    text, canvas = config.text_config, config.canvas_length
    kv = sum(2 * 4 * layer["kv_heads"] * layer["head_dim"] * min(cached, text.sliding_window - 1
                                                                 if layer["type"] == "sliding_attention" else cached)
             for layer in kv_layout(text))
    # in: ids, positions, soft embedding, uniforms; out: argmax, sampled, entropy, next soft embedding
    canvas_io = canvas * (8 + 8 + 4 * text.hidden_size + 4) + canvas * (8 + 8 + 4 + 4 * text.hidden_size)
    return kv, canvas_io


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/kv_state.py")
    parser.add_argument("--model", choices=["tiny", "canvas256"], default="canvas256")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[256, 1024, 3072])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    found = artifacts(args.model)
    mb = 1 / 2**20
    print(f"\n{args.model}, igpu-int4 with and without openvino.kv_state, OpenVINO CPU, {args.threads} threads, one block "
          f"of {args.steps} steps\n")
    print("| prompt tokens | KV | encode: MB moved | step: MB moved | KV written/read to state, MB | step ms "
          "(median) | tokens same |")
    print("|---:|---|---:|---:|---:|---:|---|")
    rng = np.random.default_rng(0)
    for length in args.prompt_tokens:
        prompt = rng.integers(5, 250, (1, length))
        runs = {kind: measure(folder, prompt, args.steps, args.threads) for kind, folder in found.items()}
        same = np.array_equal(runs["state"]["tokens"], runs["stateless"]["tokens"])
        for kind, run in runs.items():
            print(f"| {length} | {'state' if kind == 'state' else 'host'} | {run['encode'] * mb:.2f} | "
                  f"{run['step'] * mb:.3f} | {run['state'] * mb:.2f} | {run['step_ms']:.1f} | "
                  f"{'yes' if same else 'NO'} |")
    print("\n26B shape (tests/fixtures; computed, not run): bytes a denoising step moves\n")
    print("| cached tokens | KV on the host: MB per step | KV in state: MB per step |")
    print("|---:|---:|---:|")
    for cached in (1000, 4000):
        kv, canvas_io = published_bytes(cached)
        print(f"| {cached} | {(kv + canvas_io) * mb:.1f} | {canvas_io * mb:.1f} |")


if __name__ == "__main__":
    main()
