"""KV caches of token sequences encoded for earlier requests, so that a new request starts from the longest one its
prompt begins with: chat clients resend the whole history each turn, and a later turn then encodes only its new
tokens (llama.cpp's server does the same). A cache is kept whole, never cut back: its sliding-window layers hold
only the window, which cannot be rewound to an earlier position."""

from collections import OrderedDict

from dg_runtime.kv_cache import KVCache


class PrefixCache:
    """Least recently used out first, within a budget of bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()
        self.bytes = 0

    def longest_prefix(self, ids: list[int]) -> tuple[KVCache | None, int]:
        """A copy of the cache of the longest stored sequence that `ids` starts with and goes beyond (at least one
        token is left to encode: it gives the next position's state), and that sequence's length."""
        best = max((key for key in self.entries if len(key) < len(ids) and tuple(ids[: len(key)]) == key),
                   key=len, default=None)
        if best is None:
            return None, 0
        self.entries.move_to_end(best)
        return self.entries[best].copy(), len(best)

    def add(self, ids: list[int], cache: KVCache) -> None:
        """Keep a snapshot of `cache`, which holds the KV of exactly `ids`."""
        key = tuple(ids)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        if cache.nbytes > self.max_bytes:
            return
        self.entries[key] = cache.copy()
        self.bytes += cache.nbytes
        while self.bytes > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.nbytes
