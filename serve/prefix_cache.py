"""KV caches of token sequences encoded for earlier requests, so that a new request starts from the longest one its
prompt begins with: chat clients resend the whole history each turn, and a later turn then encodes only its new
tokens (llama.cpp's server does the same). A cache is kept whole, never cut back: its sliding-window layers hold
only the window, which cannot be rewound to an earlier position.

An image's tokens are the same ids whatever its pixels, so a sequence is kept with the digests of the images its
tokens stand for (`image_digest`), and matches only a prompt whose first images are those."""

import hashlib
from collections import OrderedDict

from dg_runtime.kv_cache import KVCache


def image_digest(image) -> str:
    """The identity of an (opened, PIL) image: its mode, size and pixels."""
    return hashlib.sha256(f"{image.mode} {image.size}".encode() + image.tobytes()).hexdigest()


class PrefixCache:
    """Least recently used out first, within a budget of bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[tuple[int, ...], tuple[str, ...]], KVCache] = OrderedDict()
        self.bytes = 0

    def longest_prefix(self, ids: list[int], images: tuple[str, ...] = ()) -> tuple[KVCache | None, int, int]:
        """A copy of the cache of the longest stored sequence that `ids` (with images of these digests, in order)
        starts with and goes beyond (at least one token is left to encode: it gives the next position's state), that
        sequence's length, and how many of the images it holds."""
        best = max((key for key in self.entries if len(key[0]) < len(ids) and tuple(ids[: len(key[0])]) == key[0]
                    and tuple(images[: len(key[1])]) == key[1]), key=lambda key: len(key[0]), default=None)
        if best is None:
            return None, 0, 0
        self.entries.move_to_end(best)
        return self.entries[best].copy(), len(best[0]), len(best[1])

    def add(self, ids: list[int], cache: KVCache, images: tuple[str, ...] = ()) -> None:
        """Keep a snapshot of `cache`, which holds the KV of exactly `ids` (and of the images of these digests)."""
        key = (tuple(ids), tuple(images))
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
