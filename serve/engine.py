"""One loaded model, one worker thread, a bounded queue of generations.

Requests run one at a time, in arrival order: on a CPU the model's matrix products already use every core, so
running two generations at once would only interleave their steps. Rows of different requests are not batched
either: each generation draws its noise from its own seed, which is what makes a served answer equal to
`DiffusionGemma.generate` with that seed. The worker hands each step's event to the request's asyncio queue, and
stops a generation at its next step once the request is cancelled (a client that went away, a stop string).
"""

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from dg_runtime import Block, DiffusionGemma, Done, Draft, Settings, UserError

from .openai_api import API_NAMES
from .prefix_cache import PrefixCache, image_digest

log = logging.getLogger("dg_serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Failed:
    message: str
    user_error: bool


@dataclass
class Started:
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Job:
    """One generation: its prompt and settings in, the runtime's events out (Started, Draft per step, Block per
    committed block, Done; or Failed)."""

    def __init__(self, ids: list[int], settings: Settings, seed: int, images: list = ()):
        self.ids, self.settings, self.seed, self.images = ids, settings, seed, list(images)
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event) -> None:
        self._loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(self, model: DiffusionGemma, queue_size: int = 16, prefix_cache_bytes: int = 512 << 20):
        self.model = model
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.counts = {"served": 0, "cancelled": 0, "failed": 0}
        self.running: Job | None = None
        self.mean_seconds = 1.0  # of a generation, for Retry-After
        self._thread = threading.Thread(target=self._work, name="dg-serve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if (running := self.running) is not None:  # read once: the worker may finish it meanwhile
            running.cancel()
        while True:
            try:
                self.jobs.get_nowait().cancel()
            except queue.Empty:
                break
        self.jobs.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(max(1, math.ceil(self.mean_seconds * (self.jobs.qsize() + 1)))) from None

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                self.counts["cancelled"] += 1
                continue
            self.running, started = job, time.perf_counter()
            try:
                self._generate(job)
            except UserError as exc:
                self.counts["failed"] += 1
                job.emit(Failed(exc.worded(API_NAMES), user_error=True))
            except Exception:
                log.exception("generation failed")
                self.counts["failed"] += 1
                job.emit(Failed("the generation failed; the server log has the details", user_error=False))
            finally:
                self.running = None
            self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.perf_counter() - started)

    def _generate(self, job: Job) -> None:
        digests = tuple(image_digest(image) for image in job.images)
        cache, cached, cached_images = self.prefix_cache.longest_prefix(job.ids, digests)
        cache = cache or self.model.new_cache(1)  # the runtime appends to it in place as it encodes
        events = self.model.stream(np.array([job.ids[cached:]], dtype=np.int64), settings=job.settings, seed=job.seed,
                                   cache=cache, images=job.images[cached_images:])
        job.emit(Started(cached))
        encoded = list(job.ids)  # what the cache holds once a block's first step has run
        for event in events:
            if job.cancelled.is_set():
                events.close()
                self.counts["cancelled"] += 1
                return
            if isinstance(event, Draft) and event.step == 1:
                self.prefix_cache.add(encoded, cache, digests)
            elif isinstance(event, Block):
                encoded += event.tokens[0].tolist()
            elif isinstance(event, Done):
                self.counts["served"] += 1
            job.emit(event)
