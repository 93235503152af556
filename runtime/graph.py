"""The artifact's one graph in its two modes (export/graphs.py describes it): encoding new tokens into the KV
cache, and a denoising step over the canvas. The encoder and the denoiser share the graph so that their weights
are loaded once."""

from pathlib import Path

import numpy as np

from .backends import release_mapped_pages, releasing_mapped_pages, resident_bytes, trim_heap
from .kv_cache import KVCache
from .kv_state import KVState

STEP_OUTPUTS = ["argmax", "sampled", "entropy", "next_soft_embedding"]
# The backends pack weights while loading (ONNX Runtime) or on first use (OpenVINO: when a node first runs; an
# expert, when a token first routes to it): the weights file's pages read for that are released meanwhile.
# Reading /proc/self/smaps costs ~10 ms a run, 8 times; from 32 MB of weights that is worth it (the medium
# stand-in's peak on OpenVINO: int8 427 -> 351 MB, int4-mixed 367 -> 321 MB, fp32 950 -> 815 MB).
# Past the warm-up the heap still grows (the 26B on ONNX Runtime: 20-40 MB a step, as each step's routing sizes
# its temporaries anew; +0.6 GB over a block) and weights read in place (embedding rows) come back from the file:
# once the resident size has grown UPKEEP_GROWTH past where the last upkeep left it, the heap is trimmed and the
# pages released again. (A trim walks the whole heap: ~125 ms on a 3.5 GB artifact, ~0.8 s on the 26B's. Run once
# a second, it cost every 26B-wide step that much; on growth, one step in several.)
WARMUP_RUNS = 8
UPKEEP_GROWTH = 256 << 20
RELEASE_FROM_BYTES = 32 << 20


def worth_releasing(weights_file: Path) -> bool:
    return weights_file.is_file() and weights_file.stat().st_size >= RELEASE_FROM_BYTES


class ModelGraph:
    def __init__(self, session, hidden_size: int, weights_file: Path | None = None, encode_chunk: int = 256):
        """`weights_file`: the mapped file whose pages the first runs release (None: none)."""
        self.session, self.hidden_size, self.encode_chunk = session, hidden_size, encode_chunk
        self.weights_file = weights_file
        # A graph that keeps its KV in OpenVINO's state appends it there itself: its new KV is not read out
        self.kv_state = session if isinstance(session, KVState) else None
        self.present_names = [] if self.kv_state else [n for n in session.output_names if n.startswith("present.")]
        self.runs, self.settled = 0, 0  # the resident bytes the last upkeep left
        # an artifact with the vision path takes image features (none: [0, hidden]) in every call
        self.no_images = ({"image_features": np.zeros((0, hidden_size), np.float32)}
                          if "image_features" in session.input_names else {})

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.runs += 1
        if self.weights_file is None:
            return self.session.run(outputs, feeds)
        if self.runs <= WARMUP_RUNS:
            with releasing_mapped_pages(self.weights_file):
                return self.session.run(outputs, feeds)
        results = self.session.run(outputs, feeds)
        if self.runs == WARMUP_RUNS + 1 or resident_bytes() - self.settled >= UPKEEP_GROWTH:
            trim_heap()
            release_mapped_pages(self.weights_file)
            self.settled = resident_bytes()
        return results

    def new_cache(self, kv_layout: list[dict], sliding_window: int, batch: int) -> KVCache:
        return self.kv_state.new_cache(batch) if self.kv_state else KVCache(kv_layout, sliding_window, batch)

    def encoder_feeds(self, cache: KVCache, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Causal mode over tokens not yet cached; the head reads only the last one."""
        batch, new = ids.shape
        return {"input_ids": ids.astype(np.int64),
                "position_ids": np.ascontiguousarray(np.broadcast_to(np.arange(cache.length, cache.length + new), ids.shape)),
                "soft_embedding": np.zeros((batch, 1, self.hidden_size), np.float32),
                "denoising": np.array(False), "temperature": np.array(1.0, np.float32),
                "sample_uniform": np.zeros((batch, 1), np.float32), **self.no_images, **cache.feeds()}

    def encode(self, cache: KVCache, ids: np.ndarray, image_features: np.ndarray | None = None,
               image_token_id: int | None = None) -> np.ndarray | None:
        """Append the KV of `ids` ([B, N]) to the cache, `encode_chunk` tokens a call (a long prompt's working
        memory stays that of a canvas; the cache holds what the next chunk may see, so the KV are the same);
        returns the argmax after the last token ([B]): the autoregressive next token (None for no tokens).
        `image_features` ([image tokens, hidden]) replace the embeddings of the `image_token_id` tokens in order;
        a chunk never ends inside an image (its tokens see each other)."""
        argmax, start, used = None, 0, 0
        while start < ids.shape[1]:
            stop = min(start + self.encode_chunk, ids.shape[1])
            feeds = {}
            if image_features is not None:
                while stop < ids.shape[1] and (ids[:, stop - 1: stop + 1] == image_token_id).all(axis=1).any():
                    stop += 1  # past the end of an image that the chunk would cut
                count = int((ids[:, start:stop] == image_token_id).sum())
                feeds = {"image_features": image_features[used: used + count]}
                used += count
            chunk = ids[:, start:stop]
            *presents, argmax = self.run([*self.present_names, "argmax"],
                                         {**self.encoder_feeds(cache, chunk), **feeds})
            cache.append(presents, chunk.shape[1])
            start = stop
        return None if argmax is None else argmax[:, -1]

    def denoiser_feeds(self, cache: KVCache, canvas: np.ndarray, soft: np.ndarray, positions: np.ndarray,
                       temperature: np.ndarray, uniform: np.ndarray) -> dict[str, np.ndarray]:
        """Bidirectional mode over the canvas; the head reads all of it."""
        return {"input_ids": canvas, "position_ids": positions, "soft_embedding": soft, "denoising": np.array(True),
                "temperature": temperature, "sample_uniform": uniform, **self.no_images, **cache.feeds()}
