"""The KV cache kept in OpenVINO's state (recipe field `openvino.kv_state`, for iGPUs): the prompt's keys and values
stay in the device's memory between calls instead of crossing to the host and back on every one.

The IR reads each layer's past from a variable named as the input it replaced (`past.{i}.key`, ReadValue) and
writes it back (Assign): in causal mode with the new tokens' KV appended (a sliding layer's cut to its window, as
KVCache does), in denoising mode as it was. A state belongs to an infer request, while the runtime's caches are many
(a chat turn works on a copy, dg-serve keeps prefixes): `StateCache` is the runtime's cache for such a graph, and
`KVState` runs the graph with the request's state made that cache's first. A cache whose contents are only in the
state is read out to the host when it is copied, or when another cache is about to overwrite it and it is still in
use; a copy that was not changed since is the state's already. Denoising steps move no KV at all.

Callers that hold the KV on the host (the exporter's validation, the quality report) pass `past.*` feeds as to the
stateless graph: those are written to the state before the run.
"""

import threading
import weakref

import numpy as np

STATE_FEED = "kv_state"  # the feeds' entry that names the StateCache a run uses (KVState takes it out)


class KVState:
    def __init__(self, graph, kv_layout: list[dict], sliding_window: int):
        """`graph`: an OpenVinoGraph compiled from an IR with the KV in state."""
        self.kv_layout, self.sliding_window = kv_layout, sliding_window
        self.request = graph.compiled.create_infer_request()
        self.variables = {state.name: state for state in self.request.query_state()}
        self.past_names = [f"past.{i}.{part}" for i in range(len(kv_layout)) for part in ("key", "value")]
        self.input_names = [*graph.input_names, *self.past_names]  # as the stateless graph's: past feeds are taken
        self.output_names = graph.output_names
        self.lock = threading.Lock()  # one request, one state: one run at a time
        self.holder, self.holder_version = lambda: None, None  # the cache (weakly) whose contents the state holds
        self.moved_bytes = 0  # KV written to the state or read from it (bench/kv_state.py reports it)

    def new_cache(self, batch: int) -> "StateCache":
        return StateCache(self, batch)

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = dict(feeds)
        cache = feeds.pop(STATE_FEED, None)
        past = {name: feeds.pop(name) for name in self.past_names if name in feeds}
        with self.lock:
            if cache is not None:
                self.make_current(cache)
            else:
                self.write(past)
                self.holder, self.holder_version = lambda: None, None
            self.request.infer(feeds)
            if cache is not None and not bool(feeds["denoising"]):  # the state now holds the new tokens too
                cache.snapshot, cache.version = None, object()
                self.holder, self.holder_version = weakref.ref(cache), cache.version
            return [self.request.get_tensor(name).data.copy() for name in outputs]

    def make_current(self, cache: "StateCache") -> None:
        if cache.version is self.holder_version:  # the cache, or an unchanged copy of it
            self.holder = weakref.ref(cache)
            return
        held = self.holder()
        if held is not None and held.snapshot is None and held.version is self.holder_version:
            held.snapshot = self.read()  # still in use somewhere, and only here
        if cache.length == 0:
            self.request.reset_state()  # each variable's initial value: no tokens, the batch of the run's input
        else:
            self.write(dict(zip(self.past_names, cache.snapshot)))
        self.holder, self.holder_version = weakref.ref(cache), cache.version

    def write(self, past: dict[str, np.ndarray]) -> None:
        import openvino as ov

        for name, array in past.items():
            self.variables[name].state = ov.Tensor(np.ascontiguousarray(array, np.float32))
            self.moved_bytes += array.nbytes

    def read(self) -> list[np.ndarray]:
        arrays = [self.variables[name].state.data.copy() for name in self.past_names]
        self.moved_bytes += sum(a.nbytes for a in arrays)
        return arrays


class StateCache:
    """The KV cache of a graph that keeps it in OpenVINO's state: KVCache's interface, its tensors on the device."""

    def __init__(self, state: KVState, batch: int):
        self.state, self.batch = state, batch
        self.length = 0
        self.snapshot: list[np.ndarray] | None = None  # the host copy, when there is one (None: only in the state)
        self.version = object()  # the contents: a copy shares them until either changes

    @property
    def tensors(self) -> list[np.ndarray]:
        """The KV as KVCache holds it, on the host (read out of the state if only there)."""
        with self.state.lock:
            if self.snapshot is None:
                self.snapshot = self.state.read() if self.length else [
                    np.zeros((self.batch, layer["kv_heads"], 0, layer["head_dim"]), np.float32)
                    for layer in self.state.kv_layout for _ in ("key", "value")]
        return self.snapshot

    def copy(self) -> "StateCache":
        """A snapshot: appending to either cache leaves the other as it is."""
        duplicate = StateCache(self.state, self.batch)
        duplicate.length, duplicate.snapshot, duplicate.version = self.length, self.tensors, self.version
        return duplicate

    @property
    def nbytes(self) -> int:
        keep = [self.state.sliding_window - 1 if layer["type"] == "sliding_attention" else self.length
                for layer in self.state.kv_layout]
        return sum(2 * 4 * self.batch * layer["kv_heads"] * min(self.length, kept) * layer["head_dim"]
                   for layer, kept in zip(self.state.kv_layout, keep))

    def feeds(self) -> dict:
        return {STATE_FEED: self}

    def append(self, presents: list[np.ndarray], count: int) -> None:
        """The graph appended the KV of `count` new tokens to the state itself (`presents` is empty)."""
        self.length += count
