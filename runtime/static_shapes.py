"""A static-shape graph (recipe `openvino.static`, for NPUs) presented as the dynamic one the loop calls.

Every call is padded to the graph's fixed sizes (manifest `openvino.static`): the new tokens to `tokens`, each
layer's cache to its capacity, the soft embedding and the sampling uniforms to `tokens` rows. Counts tell the graph
what is real (`new_tokens`, `past_full_length`, `past_sliding_length`); padding is masked out of attention, and the
outputs are cut back to the rows the dynamic graph returns: the new tokens' KV, and the head's last rows.
"""

import numpy as np

from .errors import UserError
from .kv_cache import KVCache

COUNTS = ("new_tokens", "past_full_length", "past_sliding_length")


class StaticShapes:
    def __init__(self, session, sizes: dict, kv_layout: list[dict]):
        self.session, self.sizes, self.kv_layout = session, sizes, kv_layout
        self.input_names = [n for n in session.input_names if n not in COUNTS]
        self.output_names = session.output_names

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """What the dynamic graph returns for `feeds`: a batch a row at a time, more new tokens than the graph takes
        a chunk at a time (causal mode: each chunk's KV joins the past of the next, sliding layers keeping their
        window, as the runtime's cache does)."""
        batch, new = feeds["input_ids"].shape
        if batch > 1:
            rows = [self.run(outputs, {k: v[b: b + 1] if v.ndim else v for k, v in feeds.items()}) for b in range(batch)]
            return [np.concatenate(parts) for parts in zip(*rows)]
        tokens = self.sizes["tokens"]
        if new <= tokens:
            return self.run_padded(outputs, feeds)
        head = feeds["sample_uniform"].shape[1]
        presents = [n for n in self.output_names if n.startswith("present.")]
        cache = KVCache(self.kv_layout, self.sizes["past_sliding"] - tokens + 1, 1)  # the window, as the runtime's
        cache.tensors = [feeds[n.replace("present.", "past.", 1)] for n in presents]
        parts = []
        for start in range(0, new, tokens):
            stop = min(new, start + tokens)
            rows = max(0, stop - max(start, new - head))  # the head's rows are the last `head` new tokens
            chunk = {**feeds, **cache.feeds(), "input_ids": feeds["input_ids"][:, start:stop],
                     "position_ids": feeds["position_ids"][:, start:stop],
                     "sample_uniform": feeds["sample_uniform"][:, head - (new - stop) - rows: head - (new - stop)]}
            results = dict(zip([*outputs, *presents], self.run_padded([*outputs, *presents], chunk)))
            cache.append([results[n] for n in presents], stop - start)
            parts.append([results[n] for n in outputs])
        return [np.concatenate(chunks, axis=2 if name.startswith("present.") else 1)
                for name, chunks in zip(outputs, zip(*parts))]

    def run_padded(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        tokens = self.sizes["tokens"]
        new, head = feeds["input_ids"].shape[1], feeds["sample_uniform"].shape[1]
        padded = {
            "input_ids": pad(feeds["input_ids"], 1, tokens),
            "position_ids": pad_positions(feeds["position_ids"], tokens),
            "soft_embedding": place_rows(feeds["soft_embedding"], new, tokens),
            "sample_uniform": place_rows(feeds["sample_uniform"], new, tokens),
            "denoising": feeds["denoising"], "temperature": feeds["temperature"],
            "new_tokens": np.array(new, np.int64),
        }
        for i, layer in enumerate(self.kv_layout):
            kind = layer["type"].split("_")[0]  # "full" or "sliding"
            for part in ("key", "value"):
                past = feeds[f"past.{i}.{part}"]
                capacity = self.sizes[f"past_{kind}"]
                if past.shape[2] > capacity:
                    raise UserError(f"this artifact caches at most {capacity} tokens (its KV capacity, fixed at "
                                    f"export); the conversation needs {past.shape[2]}: start a new one, or export with "
                                    "a larger openvino.static.kv_capacity")
                padded[f"past.{i}.{part}"] = pad(past, 2, capacity)
            padded[f"past_{kind}_length"] = np.array(feeds[f"past.{i}.key"].shape[2], np.int64)
        results = self.session.run(outputs, padded)
        rows = slice(new - head, new)  # the dynamic head reads the last `head` of the new tokens
        soft_rows = rows if bool(feeds["denoising"]) else slice(0, 0)
        return [result[:, :, :new] if name.startswith("present.") else
                result[:, soft_rows] if name == "next_soft_embedding" else result[:, rows]
                for name, result in zip(outputs, results)]


def pad(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """`array` with zeros appended along `axis` up to `size`."""
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, size - array.shape[axis])
    return np.pad(array, widths)


def pad_positions(positions: np.ndarray, size: int) -> np.ndarray:
    """Positions of the padding continue after the last real one (they are masked: any value would do)."""
    after = positions[:, -1:] + 1 + np.arange(size - positions.shape[1], dtype=np.int64)
    return np.concatenate([positions.astype(np.int64), after], axis=1)


def place_rows(array: np.ndarray, new: int, size: int) -> np.ndarray:
    """Rows that belong to the last of `new` tokens ([B, rows, ...]), placed there in `size` zero rows."""
    placed = np.zeros((array.shape[0], size, *array.shape[2:]), array.dtype)
    rows = min(array.shape[1], new)
    placed[:, new - rows: new] = array[:, array.shape[1] - rows:]
    return placed
