"""What quantization costs, measured against the fp32 graphs on the same prompts and the same noise.

Two kinds of run per prompt:
- teacher-forced: the quantized model generates; at every step the fp32 denoiser sees exactly the same canvas,
  soft embedding, noise and committed tokens (its own KV of them), so each step's argmax canvas and distribution
  are compared on equal inputs: top-1 agreement and KL(fp32 || quantized) of the tempered step distributions;
- free: both generate on their own with the same seed: steps per block, tokens per forward, and the share of
  generated positions that come out the same.
With a vision tower the same runs are repeated with a sample picture before each prompt (the fp32 side gets its own
tower's features of it), and the tower's features are compared: relative error ||ours - fp32|| / ||fp32||.
The report is written into the artifact as quality.json.
"""

import json
import time
from pathlib import Path

import numpy as np

from dg_runtime.generate import DiffusionGemma, user_message

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
        self.agreement, self.kl, self.feature_errors = [], [], []
        self.reference_rows = {}  # the model's image feature rows (bytes) -> the fp32 tower's for the same image
        # a large head has no logits output (export/graphs.py): then the steps' KL is not measured
        self.with_logits = "logits" in self.output_names and "logits" in reference.graph.session.output_names

    def __enter__(self):
        self.model.graph.session = self
        self.model.image_features = self.image_features
        return self

    def __exit__(self, *exc):
        self.model.graph.session = self.session
        del self.model.image_features

    def image_features(self, images):
        """Stands in for the model's: its tower's features, with the fp32 tower's of the same images noted."""
        ours, counts = type(self.model).image_features(self.model, images)
        theirs, _ = self.reference.image_features(images)
        self.reference_rows.update((row.tobytes(), fp32_row) for row, fp32_row in zip(ours, theirs))
        self.feature_errors.append(float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)))
        return ours, counts

    def run(self, names, feeds):
        reference = self.reference.graph
        # the reference keeps its own cache (not the model's cache or state) and its own tower's image features
        fresh = {k: v for k, v in feeds.items() if k in reference.session.input_names and not k.startswith("past.")}
        if len(fresh.get("image_features", ())):
            fresh["image_features"] = np.stack([self.reference_rows[row.tobytes()] for row in fresh["image_features"]])
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


def sample_picture(seed: int):
    """A deterministic picture of a size and aspect ratio that vary with `seed`: smooth colour ramps, with noise.
    At most 4:3, so that even a tiny tower's position table spans its patches at the default 280 tokens."""
    from PIL import Image

    height, width = ((48, 64), (80, 60), (64, 64), (45, 36))[seed % 4]
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    ramps = np.stack([np.sin(6 * x + seed), np.cos(4 * y - seed), np.sin(3 * (x + y))], axis=-1)
    pixels = 127.5 * (1 + 0.8 * ramps) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def measure(artifact: Path, reference: Path, backend: str, prompts: list[str], blocks: int = 2,
            with_images: bool = False) -> dict:
    """The report's row for one backend of the quantized artifact, against the fp32 artifact on ONNX Runtime: each
    prompt (chat template applied) is generated for up to `blocks` canvases with the seed of its index;
    `with_images`: after sample picture `seed`, and the row has the tower's feature error."""
    model, fp32 = DiffusionGemma(artifact, backend=backend), DiffusionGemma(reference, backend="onnxruntime")
    settings = model.defaults.with_overrides(max_new_tokens=blocks * model.canvas_length)
    agreement, kl, steps, fp32_steps, rates, fp32_rates, same, started = [], [], [], [], [], [], [], time.perf_counter()
    feature_errors = []
    for seed, text in enumerate(prompts):
        images = model.open_images([sample_picture(seed)]) if with_images else []
        ids = [prompt_ids(model, text, images)]
        with TeacherForced(model, fp32) as forced:
            model.generate(ids, settings=settings, seed=seed, images=images)
        agreement += forced.agreement
        kl += forced.kl
        feature_errors += forced.feature_errors
        ours, theirs = (m.generate(ids, settings=settings, seed=seed, images=images) for m in (model, fp32))
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
        **({"feature_relative_error": float(np.max(feature_errors))} if with_images else {}),
        "seconds": time.perf_counter() - started,
    }


def prompt_ids(model: DiffusionGemma, text: str, images: list) -> list[int]:
    """The prompt with its images where the chat template places them, or before it if the template places none."""
    if not images:
        return model.prompt_ids(text)
    if model.text.chat_ids([user_message(text, len(images))]).count(model.vision["image_token_id"]) == len(images):
        return model.prompt_ids(text, images=images)
    return [token for count in model.image_token_counts(images) for token in model.image_ids(count)] + \
        model.prompt_ids(text)


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
    exact = "demo_exact_match" in report["backends"][0]
    lines = [f"quality of {report['precision']} against the fp32 graphs (same prompts, same noise):",
             "  backend      step argmax agree  step KL (nats)  steps/block (fp32)  tokens/forward (fp32)  "
             "tokens same" + ("  demo exact match (fp32)" if exact else "")]
    lines += [format_row(row) for row in report["backends"]]
    if "images" in report:
        lines += ["with a sample picture before each prompt (the fp32 side reads its own tower's features):",
                  "  backend      step argmax agree  step KL (nats)  steps/block (fp32)  tokens/forward (fp32)  "
                  "tokens same  tower features error"]
        lines += [format_row(row) for row in report["images"]]
    return "\n".join(lines)


def format_row(row: dict) -> str:
    kl = "n/a" if row["step_kl_mean"] is None else f"{row['step_kl_mean']:.2e}"
    line = (f"  {row['backend']:11}  {row['step_argmax_agreement'] * 100:16.2f} %  {kl:>14}  "
            f"{row['steps_per_block']:8.2f} ({row['fp32_steps_per_block']:.2f})  "
            f"{row['tokens_per_forward']:11.2f} ({row['fp32_tokens_per_forward']:.2f})  "
            f"{row['generation_token_agreement'] * 100:9.1f} %")
    if "demo_exact_match" in row:
        line += f"  {row['demo_exact_match'] * 100:9.1f} % ({row['fp32_demo_exact_match'] * 100:.1f} %)"
    if "feature_relative_error" in row:
        line += f"  {row['feature_relative_error']:20.2e}"
    return line
