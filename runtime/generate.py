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
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .artifact import is_quantized, load_manifest
from .backends import check_memory, format_entry, open_graph, release_mapped_pages, releasing_mapped_pages
from .errors import PromptTooLong, SettingError, UserError
from .graph import STEP_OUTPUTS, ModelGraph, worth_releasing
from .kv_cache import KVCache
from .noise import NoiseSource
from .sampler import StableAndConfident, entropy_bound_accept, finalize_block, temperature
from .static_shapes import StaticShapes
from .streamer import TextStreamer, reply_tokens
from .text import TextCodec


@dataclass(frozen=True)
class Settings:
    """Generation settings; `DiffusionGemma.defaults` holds the artifact's (its generation_config.json)."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_max: float = 0.8
    t_min: float = 0.4
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    fast: bool = False  # freeze settled positions and compute only the others (see DiffusionGemma._denoise)
    freeze_after: int = 2  # fast mode: a position whose argmax held this many steps in a row freezes with it
    refresh_every: int = 0  # fast mode: every this many steps the whole canvas runs again (0: never)

    @classmethod
    def from_generation_config(cls, config: dict) -> "Settings":
        known = {k: config[k] for k in cls.__dataclass_fields__ if k in config}
        if "entropy_bound" in config.get("sampler_config", {}):
            known["entropy_bound"] = config["sampler_config"]["entropy_bound"]
        return cls(**known)

    def with_overrides(self, **overrides: int | float | None) -> "Settings":
        """These settings with the given ones replaced (None keeps a setting), checked."""
        unknown = sorted(set(overrides) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"unknown settings {unknown}; Settings has {[f.name for f in fields(self)]}")
        settings = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        settings.check()
        return settings

    def check(self) -> None:
        """Every setting finite and in range; the CLI, the server and the API share this one check."""
        if not isinstance(self.fast, (bool, np.bool_)):
            raise SettingError(f"{{fast}} must be true or false (got {self.fast!r})", "fast", value=self.fast)
        for name in ("max_new_tokens", "max_denoising_steps", "stability_threshold", "freeze_after", "refresh_every"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise SettingError(f"{{{name}}} must be a whole number (got {value!r})", name, value=value)
        for name in ("entropy_bound", "t_max", "t_min", "confidence_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating)) or isinstance(value, bool) or not math.isfinite(value):
                raise SettingError(f"{{{name}}} must be a finite number (got {value!r})", name, value=value)
        for name, low, kind in (("max_new_tokens", 1, "at least 1"), ("max_denoising_steps", 1, "at least 1"),
                                ("stability_threshold", 0, "0 or more"), ("confidence_threshold", 0, "0 or more"),
                                ("freeze_after", 1, "at least 1"), ("refresh_every", 0, "0 or more")):
            value = getattr(self, name)
            if value < low:
                raise SettingError(f"{{{name}}} must be {kind} (got {value})", name, value=value)
        if self.entropy_bound <= 0:
            raise SettingError(f"{{entropy_bound}} must be positive (got {self.entropy_bound})", "entropy_bound",
                               value=self.entropy_bound)
        if not 0 <= self.t_min < self.t_max:
            raise SettingError(f"temperatures need 0 <= {{t_min}} < {{t_max}} (got {self.t_min}, {self.t_max})",
                               "t_min", "t_max", value=self.t_min)


def check_runtime_options(backend: str | None, threads: int | None, precision: str | None, seed: int | None,
                          cache_dir: str | Path | None = None) -> None:
    """Options that configure the runtime rather than the sampler; shared by the CLIs and DiffusionGemma."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise SettingError(f"{{threads}} must be at least 1 (got {threads!r}); leave it out for the backend's choice",
                           "threads", value=threads)
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise SettingError(f"{{seed}} must be a whole number of 0 or more (got {seed!r})", "seed", value=seed)
    if cache_dir is not None and backend == "onnxruntime":
        raise SettingError("{cache_dir} is OpenVINO's model cache; ONNX Runtime has none: leave {cache_dir} out, or "
                           "choose {backend} openvino", "cache_dir", "backend", value=cache_dir)
    if precision is not None and backend == "onnxruntime":
        raise SettingError("{precision} sets OpenVINO's inference precision; ONNX Runtime computes in the "
                           "artifact's precision: leave {precision} out, or choose {backend} openvino",
                           "precision", "backend", value=precision)


@dataclass
class Draft:
    """The argmax canvas after one denoising step ([B, canvas] arrays)."""

    block: int
    step: int
    canvas: np.ndarray
    accepted: np.ndarray


@dataclass
class Block:
    """A committed block ([B, canvas] token ids, pad after EOS) and the steps it took."""

    index: int
    tokens: np.ndarray
    steps: int


@dataclass
class TextDelta:
    """Text of the reply that became final when block `block` committed (or when the generation ended)."""

    text: str
    block: int


@dataclass
class Stats:
    blocks: int = 0
    steps_per_block: list[int] = field(default_factory=list)
    tokens: int = 0
    tokens_per_forward: float = 0.0
    load_ms: float = 0.0
    prefill_ms: float = 0.0
    step_ms: float = 0.0
    tokens_per_second: float = 0.0
    canvas_computed: float = 1.0  # the share of canvas positions a step ran through the graph (fast mode: < 1)

    @classmethod
    def cut_short(cls, steps_per_block: list[int], tokens: int, seconds: float, load_ms: float = 0.0) -> "Stats":
        """The figures of a one-row generation ended at a block before its end (a stop string)."""
        return cls(blocks=len(steps_per_block), steps_per_block=list(steps_per_block), tokens=tokens,
                   tokens_per_forward=tokens / max(sum(steps_per_block), 1), load_ms=load_ms,
                   tokens_per_second=tokens / max(seconds, 1e-9))


@dataclass
class Done:
    """The end of a generation. `tokens`: [B, generated], pad after EOS, cut to max_new_tokens. From the text API
    also the reply's whole `text` and `finish_reason` ("stop": EOS or a stop string; "length": max_new_tokens)."""

    tokens: np.ndarray
    stats: Stats
    text: str | None = None
    finish_reason: str | None = None


class DiffusionGemma:
    """An exported DiffusionGemma on ONNX Runtime or OpenVINO. `dg_runtime.load` opens one."""

    def __init__(self, folder: str | Path, *, backend: str | None = None, device: str = "CPU",
                 threads: int | None = None, precision: str | None = None, verify: bool = False,
                 memory_upkeep: bool = False, cache_dir: str | Path | None = None):
        """See `dg_runtime.load`."""
        started = time.perf_counter()
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder, verify_checksums=verify)
        self.backend = backend or ("onnxruntime" if "onnx" in self.manifest["formats"] else "openvino")
        check_runtime_options(self.backend, threads, precision, seed=None, cache_dir=cache_dir)
        model = self.manifest["model"]
        self.canvas_length, self.vocab_size = model["canvas_length"], model["vocab_size"]
        self.hidden_size, self.max_positions = model["hidden_size"], model["max_position_embeddings"]
        self.eos_ids, self.pad_id = model["eos_token_ids"], model["pad_token_id"]
        self.kv_layout, self.sliding_window = model["kv_layout"], model["sliding_window"]
        generation = self.folder / "generation_config.json"
        self.defaults = Settings.from_generation_config(json.loads(generation.read_text()) if generation.is_file() else {})
        self.text = TextCodec(self.folder)
        weights_file = self.folder / format_entry(self.manifest, self.backend)[1]["weights"]
        # load_manifest checked that the file is there
        check_memory(weights_file.stat().st_size, self.backend, quantized=is_quantized(self.manifest))
        release = weights_file if memory_upkeep and worth_releasing(weights_file) else None
        with releasing_mapped_pages(release, while_loading=True) if release else nullcontext():
            session = open_graph(self.folder, self.manifest, self.backend, device, threads, precision, cache_dir)
        if release:
            release_mapped_pages(release)  # what a page-out could not drop (a file this user does not own)
        static = session.sizes if isinstance(session, StaticShapes) else None
        self.graph = ModelGraph(session, self.hidden_size, release,
                                encode_chunk=static["tokens"] if static else self.canvas_length)
        if static:  # the cache holds what the shapes were fixed for
            self.max_positions = min(self.max_positions, static["past_full"])
        self.vision = self.manifest.get("vision")  # the image path's sizes and token ids (None: text only)
        self._vision_graph, self._options = None, (device, threads, precision, cache_dir)
        self.load_ms = (time.perf_counter() - started) * 1000

    # --- images ------------------------------------------------------------------------------------------------

    def open_images(self, images: Sequence) -> list:
        """`images` (paths, bytes or PIL images) decoded and checked, as PIL images."""
        from .images import open_image

        if images and not self.vision:
            raise UserError("this artifact takes no images (it was exported text-only); give text only, or export a "
                            "checkpoint with a vision tower")
        return [open_image(image, None if isinstance(image, (str, Path)) else f"image {number + 1}")
                for number, image in enumerate(images)]

    @property
    def image_spec(self):
        from .images import ImageSpec

        v = self.vision
        return ImageSpec(v["patch_size"], v["pooling_kernel"], v["max_soft_tokens"])

    def image_features(self, images: Sequence) -> tuple[np.ndarray, list[int]]:
        """The vision graph's features of `images` (paths, bytes or PIL images) one after another ([tokens, hidden]),
        and how many image tokens each one takes in the prompt (see `image_ids`)."""
        from .images import patches

        opened = self.open_images(images)
        if self._vision_graph is None:  # opened on first use: text-only callers never pay for the tower
            self._vision_graph = open_graph(self.folder, self.manifest, self.backend, *self._options, graph="vision")
        features = []
        for number, image in enumerate(opened):
            values, positions = patches(image, self.image_spec)
            if positions.max() >= self.vision["position_embedding_size"]:
                raise UserError(f"image {number + 1} is {positions.max() + 1} patches across, more than this vision "
                                f"tower's {self.vision['position_embedding_size']} positions; crop it closer to square")
            features.append(self._vision_graph.run(["image_features"], {"pixel_values": values[None],
                                                                        "pixel_positions": positions[None]})[0][0])
        return (np.concatenate(features) if features else np.zeros((0, self.hidden_size), np.float32),
                [len(f) for f in features])

    def image_token_counts(self, images: Sequence) -> list[int]:
        """How many image tokens each (opened) image takes, from its size alone."""
        from .images import target_size

        spec, counts = self.image_spec, []
        for image in images:
            height, width = target_size(image.height, image.width, spec)
            counts.append(height * width // (spec.patch_size * spec.pooling_kernel) ** 2)
        return counts

    def place_images(self, ids: list[int], images: Sequence) -> list[int]:
        """The prompt's image tokens, one per image as the chat template writes them, each expanded to its (opened)
        image's `image_ids` (as transformers' processor does)."""
        marks = [i for i, token in enumerate(ids) if token == self.vision["image_token_id"]]
        if len(marks) != len(images):
            raise UserError(f"the chat template placed {len(marks)} image(s) for {len(images)} given: this artifact's "
                            "template does not take images; build the token ids with image_ids() and call generate")
        placed = list(ids)
        for mark, count in reversed(list(zip(marks, self.image_token_counts(images)))):
            placed[mark: mark + 1] = self.image_ids(count)
        return placed

    def image_ids(self, tokens: int) -> list[int]:
        """What stands for an image of `tokens` image tokens in a prompt: begin, the image tokens, end."""
        v = self.vision
        return [v["boi_token_id"], *[v["image_token_id"]] * tokens, v["eoi_token_id"]]

    def check_image_runs(self, input_ids: np.ndarray, counts: list[int]) -> None:
        """The prompt's runs of image tokens (row by row) must be the images' token counts, in order."""
        runs = [len(run) for row in input_ids for run in np.split(row, np.flatnonzero(np.diff(row)) + 1)
                if run[0] == self.vision["image_token_id"]]
        if runs != counts:
            raise UserError(f"the prompt's image tokens come in runs of {runs}, the images take {counts}: place "
                            "each image with DiffusionGemma.image_ids(tokens), in order")

    def new_cache(self, batch: int = 1) -> KVCache:
        return self.graph.new_cache(self.kv_layout, self.sliding_window, batch)

    # --- token ids in, token ids out ---------------------------------------------------------------------------

    def stream(self, input_ids, *, settings: Settings | None = None, seed: int = 0, cache: KVCache | None = None,
               noise: NoiseSource | None = None, images: Sequence = ()) -> Iterator[Draft | Block | Done]:
        """Generate after `input_ids` ([B, N] new tokens; `cache` holds what came before them and is extended in
        place). Yields a Draft after every step, a Block after every committed block, and Done last. `images`: the
        images whose tokens (`image_ids`) the new tokens hold, in order."""
        settings = settings or self.defaults
        settings.check()
        if noise is None:
            check_runtime_options(self.backend, None, None, seed)
        input_ids = np.atleast_2d(np.asarray(input_ids, dtype=np.int64))
        batch = input_ids.shape[0]
        if settings.fast and batch > 1:
            raise SettingError(f"{{fast}} mode generates one row at a time (got {batch}); run the rows one by one "
                               "or leave {fast} out", "fast", value=True)
        if settings.fast and self.graph.kv_state:
            raise SettingError("{fast} mode adds settled canvas positions to the KV, which this artifact keeps in "
                               "OpenVINO's state (recipe openvino.kv_state): leave {fast} out, or choose {backend} "
                               "onnxruntime or an artifact without kv_state", "fast", value=True)
        cache = cache if cache is not None else self.new_cache(batch)
        self.check_length(cache.length + input_ids.shape[1], settings)
        features = None
        if images:
            features, counts = self.image_features(images)
            self.check_image_runs(input_ids, counts)
        noise = noise or NoiseSource(seed)
        stats = Stats(load_ms=self.load_ms)
        finished = np.zeros(batch, dtype=bool)
        forward_passes = np.zeros(batch, dtype=np.int64)
        blocks, pending, step_seconds, positions_computed, started = [], input_ids, 0.0, 0, time.perf_counter()

        for index in range(math.ceil(settings.max_new_tokens / self.canvas_length)):
            encode_started = time.perf_counter()
            self.graph.encode(cache, pending, features if index == 0 else None,
                              self.vision["image_token_id"] if features is not None else None)
            if index == 0:
                stats.prefill_ms = (time.perf_counter() - encode_started) * 1000

            canvas, steps, seconds, computed = yield from self._denoise(cache, settings, noise, finished,
                                                                         forward_passes, index)
            step_seconds += seconds
            positions_computed += computed
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
        stats.canvas_computed = positions_computed / max(total_steps * self.canvas_length, 1)
        stats.tokens_per_second = generated / max(time.perf_counter() - started, 1e-9)
        yield Done(tokens, stats)

    def _denoise(self, cache: KVCache, settings: Settings, noise: NoiseSource, finished, forward_passes, index):
        """The denoising steps of one block: yields a Draft per step, returns (argmax canvas, steps, graph seconds,
        canvas positions computed).

        Fast mode (`settings.fast`, one row) freezes a position once its argmax was the same `freeze_after` steps in
        a row: it takes that token, is no longer renoised, and after one more step (which computes its keys and values
        from that token) later steps run only the other positions, with the frozen ones' keys and values added to the
        past; every `refresh_every` steps (0: never) a step runs the whole canvas again. The exact mode never freezes."""
        shape = (cache.batch, self.canvas_length)
        canvas = noise.tokens(shape, self.vocab_size)
        argmax = canvas
        soft = np.zeros((*shape, self.hidden_size), dtype=np.float32)
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(cache.length, cache.length + shape[1]), shape))
        stopper = StableAndConfident(settings.stability_threshold, settings.confidence_threshold, shape)
        done = np.zeros(shape[0], dtype=bool)
        frozen, streak = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=np.int64)
        cached = np.zeros(shape, dtype=bool)  # frozen positions whose keys and values came from their frozen token
        kv = {}  # fast mode: present name -> [B, heads, canvas, dim], each position's last computed keys or values
        outputs = STEP_OUTPUTS + (self.graph.present_names if settings.fast else [])
        seconds, computed = 0.0, 0
        for step in range(settings.max_denoising_steps, 0, -1):
            number = settings.max_denoising_steps - step + 1
            forward_passes += ~(done | finished)
            t = np.array(temperature(step, settings.max_denoising_steps, settings.t_min, settings.t_max), np.float32)
            uniform = noise.uniforms(shape)
            refresh = settings.refresh_every and number % settings.refresh_every == 0
            active = slice(None) if refresh or not cached.any() else np.flatnonzero(~cached[0])
            feeds = self.graph.denoiser_feeds(cache, canvas[:, active], soft[:, active], positions[:, active], t,
                                              uniform[:, active])
            if isinstance(active, np.ndarray):  # the frozen positions join the past
                for name, rows in kv.items():
                    past = name.replace("present.", "past.", 1)
                    feeds[past] = np.concatenate([feeds[past], rows[:, :, cached[0]]], axis=2)
            started = time.perf_counter()
            new_argmax, sampled, entropy, new_soft, *presents = self.graph.run(outputs, feeds)
            seconds += time.perf_counter() - started
            if isinstance(active, np.ndarray) or frozen.any():  # back to the whole canvas; frozen stay as they are
                new_argmax, sampled, entropy, new_soft = (scatter(whole, active, part) for whole, part in (
                    (canvas, new_argmax), (canvas, sampled), (np.zeros(shape, np.float32), entropy), (soft, new_soft)))
                for values in (new_argmax, sampled):
                    values[frozen] = canvas[frozen]
                entropy[frozen] = 0.0
            for name, part in zip(self.graph.present_names if settings.fast else [], presents):
                kv[name] = scatter(kv.get(name, np.zeros((*part.shape[:2], shape[1], part.shape[3]), np.float32)),
                                   active, part, axis=2)
            computed += shape[1] if isinstance(active, slice) else len(active)
            cached = frozen.copy()  # this step ran every frozen position with its token

            accepted = entropy_bound_accept(entropy, settings.entropy_bound) | frozen
            new_canvas = np.where(accepted, sampled, noise.tokens(shape, self.vocab_size))
            if settings.fast:  # a position whose argmax held freeze_after steps in a row freezes with that token
                streak = np.where((new_argmax == argmax) & (number > 1), streak + 1, 1)
                newly = (streak >= settings.freeze_after) & ~frozen
                new_canvas = np.where(newly, new_argmax, new_canvas)
                frozen |= newly
            # Rows that already stopped keep their state while the others go on.
            new_argmax = np.where(done[:, None], argmax, new_argmax)
            new_canvas = np.where(done[:, None], canvas, new_canvas)
            soft = np.where(done[:, None, None], soft, new_soft)
            done = done | stopper(new_argmax, entropy) | frozen.all(axis=1)
            canvas, argmax = new_canvas, new_argmax

            yield Draft(index, number, argmax, accepted)
            if done.all():
                break
        return argmax, number, seconds, computed

    def generate(self, input_ids, *, settings: Settings | None = None, seed: int = 0, cache: KVCache | None = None,
                 noise: NoiseSource | None = None, images: Sequence = ()) -> Done:
        """Run `stream` to the end and return its Done event."""
        for event in self.stream(input_ids, settings=settings, seed=seed, cache=cache, noise=noise, images=images):
            pass
        return event

    def check_length(self, prompt_length: int, settings: Settings) -> None:
        """Raise if a prompt of this many tokens (cached ones included) cannot take the new tokens."""
        if prompt_length == 0:
            raise UserError("the prompt is empty; give some text to start from")
        needed = prompt_length + math.ceil(settings.max_new_tokens / self.canvas_length) * self.canvas_length
        if needed > self.max_positions:
            raise PromptTooLong(prompt_length, settings.max_new_tokens, needed, self.max_positions)

    def reply(self, tokens: np.ndarray) -> np.ndarray:
        """A row of generated tokens up to (not including) its first EOS or pad."""
        return reply_tokens(tokens, self.eos_ids, self.pad_id)

    # --- text in, text out -------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str, *, system: str | None = None, raw: bool = False,
                   images: Sequence = ()) -> list[int]:
        """The token ids of a prompt: the chat template around it (with a system turn) unless `raw`. `images`
        (opened: `open_images`) go before the text, each as its image tokens (see `place_images`)."""
        if raw:
            if system is not None:
                raise UserError("a system message needs the chat template; leave out {raw} or {system}", "raw", "system")
            ids = [self.vision["image_token_id"]] * len(images) if images else []
            ids += self.text.encode(prompt)
        else:
            ids = self.text.chat_ids([*([{"role": "system", "content": system}] if system else []),
                                      user_message(prompt, len(images))])
        return self.place_images(ids, images) if images else ids

    def text_streamer(self, settings: Settings | None = None, stop: Sequence[str] = ()) -> TextStreamer:
        return TextStreamer(self.text, self.eos_ids, self.pad_id, (settings or self.defaults).max_new_tokens, stop)

    def stream_text(self, prompt: str, *, system: str | None = None, raw: bool = False,
                    settings: Settings | None = None, seed: int = 0, stop: Sequence[str] = (), fast: bool = False,
                    noise: NoiseSource | None = None, images: Sequence = ()) -> Iterator[Draft | TextDelta | Done]:
        """Generate a reply to `prompt` (the chat template applied unless `raw`). Yields a Draft after every step,
        a TextDelta whenever text became final, and Done last (with the whole `text` and `finish_reason`). The
        generation ends at the block where the reply ended (EOS, a `stop` string, max_new_tokens). `fast`: fast
        mode (as `Settings.fast`). `images` (paths, bytes or PIL images) come before the text in the user turn."""
        opened = self.open_images(images)
        ids = self.prompt_ids(prompt, system=system, raw=raw, images=opened)
        settings = (settings or self.defaults).with_overrides(fast=fast or None)
        yield from stream_reply(self, self.stream([ids], settings=settings, seed=seed, noise=noise, images=opened),
                                self.text_streamer(settings, stop))

    def generate_text(self, prompt: str, *, system: str | None = None, raw: bool = False,
                      settings: Settings | None = None, seed: int = 0, stop: Sequence[str] = (),
                      fast: bool = False, images: Sequence = ()) -> str:
        """The reply to `prompt` as text (see `stream_text`)."""
        for event in self.stream_text(prompt, system=system, raw=raw, settings=settings, seed=seed, stop=stop,
                                      fast=fast, images=images):
            pass
        return event.text


def user_message(text: str, images: int = 0) -> dict:
    """A user turn; with images, content parts (the images first), as chat templates that take images read them."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*[{"type": "image"}] * images, {"type": "text", "text": text}]}


def scatter(whole: np.ndarray, index, part: np.ndarray, axis: int = 1) -> np.ndarray:
    """A copy of `whole` with `part` at `index` along `axis` (a slice of everything: `part` itself)."""
    if isinstance(index, slice):
        return part
    result = whole.copy()
    result[(slice(None),) * axis + (index,)] = part
    return result


def stream_reply(model: DiffusionGemma, events: Iterator[Draft | Block | Done],
                 streamer: TextStreamer) -> Iterator[Draft | TextDelta | Done]:
    """A one-row token stream as text: Drafts pass through, blocks become TextDeltas, Done gets the text. Stops the
    generation at the block where the reply ended (a stop string: what follows would be thrown away)."""
    steps, started = [], time.perf_counter()
    for event in events:
        if isinstance(event, Draft):
            yield event
        elif isinstance(event, Block):
            steps.append(event.steps)
            if text := streamer.add(event.tokens[0]):
                yield TextDelta(text, event.index)
            if streamer.stop_string_hit:
                events.close()
                stats = Stats.cut_short(steps, len(streamer.tokens), time.perf_counter() - started, model.load_ms)
                yield Done(streamer.tokens[None], stats, streamer.text, streamer.finish_reason)
                return
        elif isinstance(event, Done):
            if text := streamer.finish():
                yield TextDelta(text, len(event.stats.steps_per_block) - 1)
            yield Done(event.tokens, event.stats, streamer.text, streamer.finish_reason)


class Chat:
    """A multi-turn conversation that keeps the KV cache: a later turn encodes only its new tokens.

    `messages` ([{"role": "system" | "user" | "assistant", "content": str}, ...]) starts from a given history (it
    is encoded with the first new turn); a user message's content may also be parts, as chat templates read them:
    [{"type": "image", "image": a path, bytes or PIL image}, {"type": "text", "text": str}]. A turn that does not
    reach its end (the caller stops iterating, an exception, Ctrl-C) leaves no trace: the cache and `messages`
    change only when a turn's Done is yielded."""

    def __init__(self, model: DiffusionGemma, *, system: str | None = None, messages: Sequence[dict] = (),
                 settings: Settings | None = None):
        self.model, self.settings = model, settings or model.defaults
        self.messages, images = check_messages([*([{"role": "system", "content": system}] if system else []),
                                                *messages])
        self.unencoded_images = model.open_images(images)  # the history's, encoded with the first new turn
        self.cache = model.new_cache(1)
        self.unencoded = np.zeros((1, 0), dtype=np.int64)  # the last reply's tokens, not yet in the cache

    def stream(self, text: str, *, seed: int = 0, images: Sequence = ()) -> Iterator[Draft | TextDelta | Done]:
        """Add a user turn (`images` before its text) and generate the reply; yields as
        `DiffusionGemma.stream_text`."""
        opened = self.model.open_images(images)
        message = user_message(text, len(opened))
        if self.cache.length == 0:  # nothing encoded yet: the whole conversation
            new_ids = self.model.text.chat_ids([*self.messages, message])
            opened = [*self.unencoded_images, *opened]
        else:  # the history up to the last reply is cached (the reply's last tokens may still be unencoded)
            new_ids = self.model.text.continuation_ids(self.messages, message)
        if opened:
            new_ids = self.model.place_images(new_ids, opened)
        input_ids = np.concatenate([self.unencoded, np.array([new_ids], dtype=np.int64)], axis=1)
        cache = self.cache.copy()  # the turn extends a copy: the conversation changes only when the turn ends
        streamer = self.model.text_streamer(self.settings)
        events = self.model.stream(input_ids, settings=self.settings, seed=seed, cache=cache, images=opened)
        for event in stream_reply(self.model, events, streamer):
            if isinstance(event, Done):
                # Blocks before the last one were encoded during generation; the last reply block was not.
                encoded_blocks = len(event.stats.steps_per_block) - 1
                self.cache, self.unencoded_images = cache, []
                self.unencoded = streamer.tokens[None, encoded_blocks * self.model.canvas_length:]
                self.messages = [*self.messages, message, {"role": "assistant", "content": event.text}]
            yield event

    def send(self, text: str, *, seed: int = 0, images: Sequence = ()) -> str:
        """Add a user turn and return the reply's text."""
        for event in self.stream(text, seed=seed, images=images):
            pass
        return event.text


def check_messages(messages: Sequence[dict]) -> tuple[list[dict], list]:
    """The messages as the chat template reads them (an image part without its image), and the images in order."""
    checked, images = [], []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant") or not (
                isinstance(content, str) or role == "user" and isinstance(content, list)):
            raise UserError(f"messages[{i}] must be {{'role': one of system, user, assistant, 'content': a string, "
                            f"or for a user a list of text and image parts}} (got {message!r})")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image" and "image" in part:
                    images.append(part["image"])
                elif kind != "text" or not isinstance(part.get("text"), str):
                    raise UserError(f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': a string}} or "
                                    f"{{'type': 'image', 'image': a path, bytes or PIL image}} (got {part!r})")
            content = [{"type": "image"} if part["type"] == "image" else part for part in content]
        checked.append({"role": role, "content": content})
    return checked, images
