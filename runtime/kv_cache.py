"""The prompt KV the runtime keeps between encoder calls, laid out as the graphs expect.

Full-attention layers keep every token; sliding layers keep the last `sliding_window - 1`, exactly what
transformers' DynamicCache keeps, which is all the next query (or the bidirectional canvas) may see.
"""

import numpy as np


class KVCache:
    def __init__(self, layout: list[dict], sliding_window: int, batch: int):
        self.layout = layout
        self.keep = [sliding_window - 1 if layer["type"] == "sliding_attention" else None for layer in layout]
        self.tensors = [
            np.zeros((batch, layer["kv_heads"], 0, layer["head_dim"]), dtype=np.float32)
            for layer in layout
            for _ in ("key", "value")
        ]
        self.length = 0  # tokens encoded so far (positions of new tokens start here)

    def copy(self) -> "KVCache":
        """A snapshot: appending to either cache leaves the other as it is (append builds new arrays)."""
        snapshot = KVCache.__new__(KVCache)
        snapshot.layout, snapshot.keep, snapshot.length = self.layout, self.keep, self.length
        snapshot.tensors = list(self.tensors)
        return snapshot

    @property
    def batch(self) -> int:
        return self.tensors[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def feeds(self) -> dict[str, np.ndarray]:
        return {f"past.{i // 2}.{('key', 'value')[i % 2]}": t for i, t in enumerate(self.tensors)}

    def append(self, presents: list[np.ndarray], count: int) -> None:
        """Add the encoder's KV for `count` new tokens, then trim the sliding layers to their window."""
        for i, new in enumerate(presents):
            merged = np.concatenate([self.tensors[i], new], axis=2)
            keep = self.keep[i // 2]
            self.tensors[i] = merged[:, :, -keep:] if keep is not None and merged.shape[2] > keep else merged
        self.length += count
