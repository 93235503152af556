"""What quantization costs, measured against the fp32 graphs on the same prompts and the same noise.

Two kinds of run per prompt:
- teacher-forced: the quantized model generates; at every step the fp32 denoiser sees exactly the same canvas,
  soft embedding, noise and committed tokens (its own KV of them), so each step's argmax canvas and distribution
  are compared on equal inputs: top-1 agreement and KL(fp32 || quantized) of the tempered step distributions;
- free: both generate on their own with the same seed: steps per block, tokens per forward, and the share of
  generated positions that come out the same.
The report is written into the artifact as quality.json.
"""

import json
import time
from pathlib import Path

import numpy as np

from dg_runtime.generate import DiffusionGemma

REPORT_FILE = "quality.json"
PROMPT_COUNT, PROMPT_SEED = 8, 12345  # how many held-out problems the exporter measures on, drawn from which seed
EXACT_MATCH_COUNT = {"tiny": 100, "canvas256": 24}  # problems drawn for an embedded model's exact match


class TeacherForced:
    """Stands in for the quantized model's graph session: runs it, then the fp32 graph on the same inputs (the fp32
    side keeps its own KV cache of the same tokens), and records each denoising step's comparison."""

    def __init__(self, model: DiffusionGemma, reference: DiffusionGemma):
        self.model, self.reference = model, reference
        self.session = model.graph.session
        self.output_names = self.session.output_names
        self.cache = reference.new_cache(1)
        self.agreement, self.kl = [], []
        # a large head has no logits output (export/graphs.py): then the steps' KL is not measured
        self.with_logits = "logits" in self.output_names and "logits" in reference.graph.session.output_names

    def __enter__(self):
        self.model.graph.session = self
        return self

    def __exit__(self, *exc):
        self.model.graph.session = self.session

    def run(self, names, feeds):
        reference = self.reference.graph
        # the reference keeps its own cache, and is text-only: not the model's cache, state or image features
        fresh = {k: v for k, v in feeds.items() if k in reference.session.input_names and not k.startswith("past.")}
        if not feeds["denoising"]:
            self.cache.append(reference.run(reference.present_names, {**fresh, **self.cache.feeds()}),
                              fresh["input_ids"].shape[1])
            return self.session.run(names, feeds)
        extra = ["logits"] if self.with_logits else []
        outputs = self.session.run([*names, *extra], feeds)
        reference_outputs = reference.run(["argmax", *extra], {**fresh, **self.cache.feeds()})
        self.agreement.append(float(np.mean(outputs[names.index("argmax")] == reference_outputs[0])))
        if self.with_logits:
            self.kl.append(kl_divergence(reference_outputs[1], outputs[-1], float(feeds["temperature"])))
        return outputs[: len(names)]


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray, temperature: float) -> float:
    """Mean over positions of KL(p_fp32 || p_quantized) of the tempered distributions, in nats."""
    log_p, log_q = (log_softmax(x.astype(np.float64) / temperature) for x in (reference_logits, logits))
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def measure(artifact: Path, reference: Path, backend: str, prompts: list[str], blocks: int = 2) -> dict:
    """The report's row for one backend of the quantized artifact, against the fp32 artifact on ONNX Runtime: each
    prompt (chat template applied) is generated for up to `blocks` canvases with the seed of its index."""
    model, fp32 = DiffusionGemma(artifact, backend=backend), DiffusionGemma(reference, backend="onnxruntime")
    settings = model.defaults.with_overrides(max_new_tokens=blocks * model.canvas_length)
    agreement, kl, steps, fp32_steps, rates, fp32_rates, same, started = [], [], [], [], [], [], [], time.perf_counter()
    for seed, text in enumerate(prompts):
        ids = [model.prompt_ids(text)]
        with TeacherForced(model, fp32) as forced:
            model.generate(ids, settings=settings, seed=seed)
        agreement += forced.agreement
        kl += forced.kl
        ours, theirs = model.generate(ids, settings=settings, seed=seed), fp32.generate(ids, settings=settings, seed=seed)
        steps += ours.stats.steps_per_block
        fp32_steps += theirs.stats.steps_per_block
        rates.append(ours.stats.tokens_per_forward)
        fp32_rates.append(theirs.stats.tokens_per_forward)
        length = max(ours.tokens.shape[1], theirs.tokens.shape[1])
        same.append(np.mean(pad_to(ours.tokens, length, model.pad_id) == pad_to(theirs.tokens, length, model.pad_id)))
    return {
        "backend": backend,
        "prompts": len(prompts),
        "steps_compared": len(agreement),
        "step_argmax_agreement": float(np.mean(agreement)),
        "step_kl_mean": float(np.mean(kl)) if kl else None,
        "steps_per_block": float(np.mean(steps)),
        "fp32_steps_per_block": float(np.mean(fp32_steps)),
        "tokens_per_forward": float(np.mean(rates)),
        "fp32_tokens_per_forward": float(np.mean(fp32_rates)),
        "generation_token_agreement": float(np.mean(same)),
        "seconds": time.perf_counter() - started,
    }


def pad_to(tokens: np.ndarray, length: int, pad_id: int) -> np.ndarray:
    return np.pad(tokens, ((0, 0), (0, length - tokens.shape[1])), constant_values=pad_id)


def exact_match(artifact: Path, backend: str, problems: list[tuple[str, str]]) -> float:
    """The share of (prompt, answer) problems answered exactly, problem i generated with seed i."""
    model = DiffusionGemma(artifact, backend=backend)
    return float(np.mean([model.generate_text(prompt, seed=seed) == answer
                          for seed, (prompt, answer) in enumerate(problems)]))


def write_report(artifact: Path, report: dict) -> None:
    (Path(artifact) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def read_report(artifact: Path) -> dict:
    return json.loads((Path(artifact) / REPORT_FILE).read_text())


def format_report(report: dict) -> str:
    lines = [f"quality of {report['precision']} against the fp32 graphs (same prompts, same noise):",
             "  backend      step argmax agree  step KL (nats)  steps/block (fp32)  tokens/forward (fp32)  "
             "tokens same" + ("  demo exact match (fp32)" if "demo_exact_match" in report["backends"][0] else "")]
    for row in report["backends"]:
        kl = "n/a" if row["step_kl_mean"] is None else f"{row['step_kl_mean']:.2e}"
        line = (f"  {row['backend']:11}  {row['step_argmax_agreement'] * 100:16.2f} %  {kl:>14}  "
                f"{row['steps_per_block']:8.2f} ({row['fp32_steps_per_block']:.2f})  "
                f"{row['tokens_per_forward']:11.2f} ({row['fp32_tokens_per_forward']:.2f})  "
                f"{row['generation_token_agreement'] * 100:9.1f} %")
        if "demo_exact_match" in row:
            line += f"  {row['demo_exact_match'] * 100:9.1f} % ({row['fp32_demo_exact_match'] * 100:.1f} %)"
        lines.append(line)
    return "\n".join(lines)
