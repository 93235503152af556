"""The block-diffusion loop over an exported artifact (DESIGN.md section 1, in order).

    encode new tokens -> KV                       (the graph, causal mode)
    per block: canvas of uniform random tokens
      per step (counting down):  denoise          (the graph, denoising mode: argmax, sampled, entropy, soft embedding)
                                 accept / renoise (entropy bound)
                                 stop when stable and confident
      commit the argmax canvas; EOS ends a row, pad after it
    the committed block is encoded before the next one
"""

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .artifact import load_manifest
from .backends import check_memory, format_entry, open_graph, release_mapped_pages, releasing_mapped_pages
from .errors import UserError
from .graph import STEP_OUTPUTS, ModelGraph, worth_releasing
from .kv_cache import KVCache
from .noise import NoiseSource
from .sampler import StableAndConfident, entropy_bound_accept, finalize_block, temperature
from .text import TextCodec


@dataclass(frozen=True)
class Settings:
    """Generation settings; defaults come from the artifact's generation_config.json."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_max: float = 0.8
    t_min: float = 0.4
    stability_threshold: int = 1
    confidence_threshold: float = 0.005

    @classmethod
    def from_generation_config(cls, config: dict) -> "Settings":
        known = {k: config[k] for k in cls.__dataclass_fields__ if k in config}
        if "entropy_bound" in config.get("sampler_config", {}):
            known["entropy_bound"] = config["sampler_config"]["entropy_bound"]
        return cls(**known)

    def with_overrides(self, **overrides) -> "Settings":
        settings = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        settings.check()
        return settings

    def check(self) -> None:
        """Every setting finite and in range; the CLI and the API share this one check."""
        for name in ("max_new_tokens", "max_denoising_steps", "stability_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise UserError(f"{name} must be a whole number (got {value!r})")
        for name in ("entropy_bound", "t_max", "t_min", "confidence_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
                raise UserError(f"{name} must be a finite number (got {value!r})")
        if self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.max_denoising_steps <= 0:
            raise UserError(f"max_denoising_steps must be at least 1 (got {self.max_denoising_steps})")
        if not 0 <= self.t_min < self.t_max:
            raise UserError(f"temperatures need 0 <= t_min < t_max (got {self.t_min}, {self.t_max})")
        if self.entropy_bound <= 0:
            raise UserError(f"entropy_bound must be positive (got {self.entropy_bound})")
        if self.stability_threshold < 0:
            raise UserError(f"stability_threshold must be 0 or more (got {self.stability_threshold})")
        if self.confidence_threshold < 0:
            raise UserError(f"confidence_threshold must be 0 or more (got {self.confidence_threshold})")


def check_runtime_options(backend: str | None, threads: int | None, precision: str | None, seed: int | None) -> None:
    """Options that configure the runtime rather than the sampler; shared by the CLI and DiffusionGemma."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise UserError(f"threads must be at least 1 (got {threads!r}); leave it out for the backend's choice")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
        raise UserError(f"seed must be a whole number of 0 or more (got {seed!r})")
    if precision is not None and backend == "onnxruntime":
        raise UserError("--precision sets OpenVINO's inference precision; ONNX Runtime computes in the artifact's "
                        "precision: drop --precision, or use --backend openvino")


@dataclass
class Draft:
    """The argmax canvas after one denoising step."""

    block: int
    step: int
    canvas: np.ndarray
    accepted: np.ndarray


@dataclass
class Block:
    """A committed block (pad after EOS)."""

    index: int
    tokens: np.ndarray
    steps: int


@dataclass
class Stats:
    blocks: int = 0
    steps_per_block: list = field(default_factory=list)
    tokens: int = 0
    tokens_per_forward: float = 0.0
    load_ms: float = 0.0
    prefill_ms: float = 0.0
    step_ms: float = 0.0
    tokens_per_second: float = 0.0


@dataclass
class Done:
    tokens: np.ndarray  # [B, generated], pad after EOS, cut to max_new_tokens
    stats: Stats


class DiffusionGemma:
    """An exported DiffusionGemma on ONNX Runtime or OpenVINO."""

    def __init__(self, folder, backend: str | None = None, device: str = "CPU", threads: int | None = None,
                 precision: str | None = None, verify: bool = True):
        """backend None picks onnxruntime if the artifact has ONNX graphs, else openvino."""
        started = time.perf_counter()
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder, verify_checksums=verify)
        self.backend = backend or ("onnxruntime" if "onnx" in self.manifest["formats"] else "openvino")
        check_runtime_options(self.backend, threads, precision, seed=None)
        model = self.manifest["model"]
        self.canvas_length, self.vocab_size = model["canvas_length"], model["vocab_size"]
        self.hidden_size, self.max_positions = model["hidden_size"], model["max_position_embeddings"]
        self.eos_ids, self.pad_id = model["eos_token_ids"], model["pad_token_id"]
        self.kv_layout, self.sliding_window = model["kv_layout"], model["sliding_window"]
        generation = self.folder / "generation_config.json"
        self.defaults = Settings.from_generation_config(json.loads(generation.read_text()) if generation.is_file() else {})
        self.text = TextCodec(self.folder)
        weights_file = self.folder / format_entry(self.manifest, self.backend)[1]["weights"]
        check_memory(weights_file.stat().st_size, self.backend)  # load_manifest checked that the file is there
        release = weights_file if worth_releasing(weights_file) else None
        with releasing_mapped_pages(release, while_loading=True) if release else nullcontext():
            session = open_graph(self.folder, self.manifest, self.backend, device, threads, precision)
        if release:
            release_mapped_pages(release)  # what a page-out could not drop (a file this user does not own)
        self.graph = ModelGraph(session, self.hidden_size, release, encode_chunk=self.canvas_length)
        self.load_ms = (time.perf_counter() - started) * 1000

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self.kv_layout, self.sliding_window, batch)

    def stream(self, input_ids, settings: Settings | None = None, seed: int = 0, cache: KVCache | None = None,
               noise: NoiseSource | None = None):
        """Generate after `input_ids` ([B, N] new tokens; `cache` holds what came before them).

        Yields Draft after every step, Block after every committed block, and Done last.
        """
        settings = settings or self.defaults
        settings.check()
        if noise is None:
            check_runtime_options(self.backend, None, None, seed)
        input_ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
        batch = input_ids.shape[0]
        cache = cache if cache is not None else self.new_cache(batch)
        self.check_length(cache.length + input_ids.shape[1], settings)
        noise = noise or NoiseSource(seed)
        stats = Stats(load_ms=self.load_ms)
        finished = np.zeros(batch, dtype=bool)
        forward_passes = np.zeros(batch, dtype=np.int64)
        blocks, pending, step_seconds, started = [], input_ids, 0.0, time.perf_counter()

        for index in range(math.ceil(settings.max_new_tokens / self.canvas_length)):
            encode_started = time.perf_counter()
            self.graph.encode(cache, pending)
            if index == 0:
                stats.prefill_ms = (time.perf_counter() - encode_started) * 1000

            canvas, steps, seconds = yield from self._denoise(cache, settings, noise, finished, forward_passes, index)
            step_seconds += seconds
            block, finished = finalize_block(canvas, finished, self.eos_ids, self.pad_id)
            blocks.append(block)
            stats.steps_per_block.append(steps)
            yield Block(index, block, steps)
            if finished.all():
                break
            pending = block

        tokens = np.concatenate(blocks, axis=1)[:, : settings.max_new_tokens]
        per_row = (tokens != self.pad_id).sum(axis=1)
        generated = int(per_row.sum())
        total_steps = sum(stats.steps_per_block)
        stats.blocks, stats.tokens = len(blocks), generated
        stats.tokens_per_forward = float(np.mean(per_row / np.maximum(forward_passes, 1)))
        stats.step_ms = step_seconds * 1000 / max(total_steps, 1)
        stats.tokens_per_second = generated / max(time.perf_counter() - started, 1e-9)
        yield Done(tokens, stats)

    def _denoise(self, cache: KVCache, settings: Settings, noise: NoiseSource, finished, forward_passes, index):
        """The denoising steps of one block: yields a Draft per step, returns (argmax canvas, steps, graph seconds)."""
        shape = (cache.tensors[0].shape[0], self.canvas_length)
        canvas = noise.tokens(shape, self.vocab_size)
        argmax = canvas
        soft = np.zeros((*shape, self.hidden_size), dtype=np.float32)
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(cache.length, cache.length + shape[1]), shape))
        stopper = StableAndConfident(settings.stability_threshold, settings.confidence_threshold, shape)
        done = np.zeros(shape[0], dtype=bool)
        seconds = 0.0
        for step in range(settings.max_denoising_steps, 0, -1):
            forward_passes += ~(done | finished)
            t = temperature(step, settings.max_denoising_steps, settings.t_min, settings.t_max)
            feeds = self.graph.denoiser_feeds(cache, canvas, soft, positions, np.array(t, dtype=np.float32),
                                              noise.uniforms(shape))
            started = time.perf_counter()
            new_argmax, sampled, entropy, new_soft = self.graph.run(STEP_OUTPUTS, feeds)
            seconds += time.perf_counter() - started

            accepted = entropy_bound_accept(entropy, settings.entropy_bound)
            new_canvas = np.where(accepted, sampled, noise.tokens(shape, self.vocab_size))
            # Rows that already stopped keep their state while the others go on.
            new_argmax = np.where(done[:, None], argmax, new_argmax)
            new_canvas = np.where(done[:, None], canvas, new_canvas)
            soft = np.where(done[:, None, None], soft, new_soft)
            done = done | stopper(new_argmax, entropy)
            canvas, argmax = new_canvas, new_argmax

            yield Draft(index, settings.max_denoising_steps - step + 1, argmax, accepted)
            if done.all():
                break
        return argmax, settings.max_denoising_steps - step + 1, seconds

    def check_length(self, prompt_length: int, settings: Settings) -> None:
        """Raise UserError if a prompt of this many tokens (cached ones included) cannot take the new tokens."""
        if prompt_length == 0:
            raise UserError("the prompt is empty; give some text to start from")
        needed = prompt_length + math.ceil(settings.max_new_tokens / self.canvas_length) * self.canvas_length
        if needed > self.max_positions:
            raise UserError(f"prompt ({prompt_length} tokens) plus {settings.max_new_tokens} new tokens needs "
                            f"{needed} positions; the model has {self.max_positions}: shorten the prompt or "
                            "lower --max-new-tokens")

    def reply(self, tokens: np.ndarray) -> np.ndarray:
        """A row of generated tokens up to (not including) its first EOS or pad."""
        return trim_reply(tokens, self.eos_ids, self.pad_id)

    def generate(self, input_ids, settings: Settings | None = None, seed: int = 0, **kwargs) -> Done:
        """Run `stream` to the end and return its Done event."""
        for event in self.stream(input_ids, settings, seed, **kwargs):
            pass
        return event


def trim_reply(tokens: np.ndarray, eos_ids: list[int], pad_id: int | None) -> np.ndarray:
    """A row of generated tokens up to (not including) its first EOS."""
    stop = np.flatnonzero(np.isin(tokens, eos_ids) | (tokens == pad_id))
    return tokens[: stop[0]] if len(stop) else tokens


class Chat:
    """A multi-turn conversation that keeps the KV cache: a later turn encodes only its new tokens."""

    def __init__(self, model: DiffusionGemma, system: str | None = None, settings: Settings | None = None):
        self.model, self.settings = model, settings or model.defaults
        self.messages = [{"role": "system", "content": system}] if system else []
        self.cache = model.new_cache(1)
        self.unencoded = np.zeros((1, 0), dtype=np.int64)  # the last reply's tokens, not yet in the cache

    def stream(self, user_text: str, seed: int = 0):
        message = {"role": "user", "content": user_text}
        if not self.messages or self.messages[-1]["role"] != "assistant":
            new_ids = self.model.text.chat_ids([*self.messages, message])
        else:
            new_ids = self.model.text.continuation_ids(self.messages, message)
        input_ids = np.concatenate([self.unencoded, np.array([new_ids], dtype=np.int64)], axis=1)
        for event in self.model.stream(input_ids, self.settings, seed, cache=self.cache):
            yield event
        reply = self.model.reply(event.tokens[0])
        # Blocks before the last one were encoded during generation; the last reply block was not.
        encoded_blocks = len(event.stats.steps_per_block) - 1
        self.unencoded = reply[None, encoded_blocks * self.model.canvas_length:]
        self.messages += [message, {"role": "assistant", "content": self.model.text.decode(reply)}]
