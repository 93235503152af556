"""One small class per backend with the same `run(output_names, feeds)` call, and the checks that go with it."""

import ctypes
import functools
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import ArtifactError, BackendUnavailable, NotEnoughMemory, SettingError, UserError
from .kv_state import KVState
from .static_shapes import StaticShapes

BACKENDS = ("onnxruntime", "openvino")


class OnnxRuntimeGraph:
    def __init__(self, path: Path, threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("backend onnxruntime is not installed: pip install 'dg-edge[onnxruntime]'",
                                     "onnxruntime") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(outputs, feeds)


# OpenVINO's devices that dispatch to others ("AUTO", "AUTO:GPU,CPU", "HETERO:NPU,CPU"): options go to those others
VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


def openvino_config(core, device: str, precision: str | None, artifact_precision: str, threads: int | None) -> dict:
    """The compile options for `device`, which must be present. Each option goes to the devices that take it (through
    AUTO and the like to the devices they dispatch to); one the user set that no such device takes is refused rather
    than dropped (OpenVINO's GPU and NPU plugins have no thread count, NPU no precision hint). The artifact's own
    precision applies wherever a device takes one: CPUs with AMX otherwise compute in bf16."""
    available = core.available_devices  # "GPU" alone, or "GPU.0", "GPU.1" when there are several
    kind, _, listed = device.upper().partition(":")
    virtual = kind in VIRTUAL_DEVICES
    targets = ([d for d in listed.split(",") if d] or available) if virtual else [kind]
    missing = [d for d in targets if d not in available and not any(a.split(".")[0] == d for a in available)]
    if missing:
        raise BackendUnavailable(f"OpenVINO device {', '.join(missing)} is not available here; OpenVINO sees: "
                                 f"{', '.join(available)} (or AUTO): choose one with {{device}}", "openvino", device)
    per_device = {target: {} for target in targets}
    for field, key, value, asked in (("precision", "INFERENCE_PRECISION_HINT", precision or artifact_precision,
                                      precision is not None), ("threads", "INFERENCE_NUM_THREADS", threads, threads)):
        taking = [t for t in targets if key in core.get_property(t, "SUPPORTED_PROPERTIES")]
        if asked and not taking:
            raise SettingError(f"{{{field}}} is not an option of OpenVINO's {device} device: leave {{{field}}} out, "
                               "or choose {device} CPU", field, "device", value=value)
        for target in taking if value else ():
            per_device[target][key] = value
    if not virtual:
        return per_device[kind]
    return {"DEVICE_PROPERTIES": {target: options for target, options in per_device.items() if options}}


class OpenVinoGraph:
    def __init__(self, xml: Path, weights: Path | None, device: str, precision: str | None, artifact_precision: str,
                 threads: int | None, cache_dir: Path | None = None):
        """`cache_dir`: OpenVINO's model cache (the compiled model, packed weights included, is written there on the
        first start and read on later ones instead of compiling again)."""
        try:
            import openvino as ov
        except ImportError:
            raise BackendUnavailable("backend openvino is not installed: pip install 'dg-edge[openvino]'",
                                     "openvino") from None
        core = ov.Core()
        if cache_dir is not None:
            core.set_property({"CACHE_DIR": str(cache_dir)})
        config = openvino_config(core, device, precision, artifact_precision, threads)
        model = core.read_model(str(xml), str(weights)) if weights else core.read_model(str(xml))
        self.compiled = core.compile_model(model, device, config)
        self._requests = threading.local()  # an infer request runs one inference at a time: one per thread
        self.input_names = [graph_name(p) for p in self.compiled.inputs]
        self.output_names = [graph_name(p) for p in self.compiled.outputs]

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        request.infer(feeds)
        return [request.get_tensor(name).data.copy() for name in outputs]


def available_memory() -> int | None:
    """Bytes of memory the kernel says are available (Linux), else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


# A run's peak RSS per byte of stored weights, float or quantized, with the memory upkeep dg-run and dg-serve turn
# on. Quantized: the 26B's cpu-int4-mixed artifact (a 1,000-token prompt and a full block: ONNX Runtime 19.25 GB,
# OpenVINO 21.22 GB for 14.35 GB of weights; the backends' packed int4 layouts hold more than the stored bytes).
# Float: OpenVINO repacks fp32 weights into its own layout while it reads the mapped file (2.2x per byte measured
# between two artifacts that differ only in their experts; ONNX Runtime 1.0x). tests/test_memory.py holds both
# backends to these per byte.
PEAK_OVER_WEIGHTS = {("onnxruntime", False): 1.1, ("onnxruntime", True): 1.35,
                     ("openvino", False): 2.3, ("openvino", True): 1.5}
WORKING_BYTES = 0.3e9


def check_memory(weights_bytes: int, backend: str, quantized: bool) -> None:
    """Refuse, before loading, an artifact whose run cannot fit the memory this machine has available (the
    backend's packed weights plus working memory), instead of being killed while loading or generating."""
    available = available_memory()
    factor = PEAK_OVER_WEIGHTS[backend, quantized]
    needed = factor * weights_bytes + WORKING_BYTES
    if available is not None and needed > available:
        raise NotEnoughMemory(f"this artifact needs about {needed / 1e9:.1f} GB of memory on {backend} ({factor} x its "
                              f"{weights_bytes / 1e9:.1f} GB of weights + {WORKING_BYTES / 1e9:.1f} GB) and "
                              f"{available / 1e9:.1f} GB are available: export it with a smaller recipe "
                              "(cpu-int4-mixed), or free memory", int(needed), available)


MADV_DONTNEED, MADV_PAGEOUT = 4, 21
TRIM_EVERY = 4  # a trim walks the whole heap (0.8 s at the 26B's 18 GB): every 2 s


def release_mapped_pages(path: Path, while_loading: bool = False) -> int:
    """Drop this process's resident pages of unmodified mappings of `path`; returns the bytes released.

    Both backends map the weights file and copy most weights into packed layouts of their own (ONNX Runtime while it
    loads, OpenVINO at first inference); the mapped pages they read for that stay resident (counted twice: the
    file's and the copy) though they are not read again. A page read later (an embedding row, a weight used in
    place) comes back from the file. Mappings with a written page (their Anonymous count is not 0) are left alone.

    By default the pages are unmapped (MADV_DONTNEED: they stay in the page cache). That is only safe while the
    backend does not map or unmap the file: ONNX Runtime unmaps tensors as it packs them while it loads, and an
    address read from /proc/self/smaps may by then belong to a new allocation, whose memory DONTNEED would zero
    (seen: heap corruption). `while_loading` uses MADV_PAGEOUT instead, a request to reclaim that never changes
    memory's contents: a clean file page is dropped (read from disk again if needed), anything else stays or is
    swapped out. It needs ownership of (or write access to) the file to drop file pages; without it, nothing is
    released. Linux only; elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advice, target = MADV_PAGEOUT if while_loading else MADV_DONTNEED, str(Path(path).resolve())
    mappings, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split(maxsplit=5)
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                current = None
                if len(fields) == 6 and fields[5].strip() == target:
                    current = [*(int(x, 16) for x in fields[0].split("-")), 0, 0]
                    mappings.append(current)
            elif current is not None and fields[0] in ("Rss:", "Anonymous:"):
                current[2 if fields[0] == "Rss:" else 3] = int(fields[1])
    released = 0
    for start, end, resident, written in mappings:
        if resident and not written and libc.madvise(start, end - start, advice) == 0:
            released += resident * 1024
    return released


def trim_heap() -> int:
    """Return the C heap's free pages to the kernel (glibc's malloc_trim); the bytes of RSS it gave back.

    Loading leaves much freed memory in the heap: the backends convert and copy weights through temporary buffers
    while packing them, and glibc keeps freed pages that are not at the top of an arena. Measured on the 26B's
    int4 artifact on ONNX Runtime: 0.9 GB of its 18.2 GB after loading (that amount varied from run to run
    before). Elsewhere (not glibc) a no-op."""
    malloc_trim = glibc_malloc_trim()
    if malloc_trim is None:
        return 0
    before = resident_bytes()
    malloc_trim(0)
    return max(before - resident_bytes(), 0)


@functools.cache
def glibc_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and others: no malloc_trim
        return None


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def releasing_mapped_pages(path: Path, while_loading: bool = False, every: float = 0.5):
    """Release `path`'s mapped pages every `every` seconds while the block runs (and once at its end): loading or
    the first runs read most of the weights file once, and without this their pages would add up to the whole
    file on top of the backend's own copy before the first release. The heap is trimmed too (every TRIM_EVERY
    releases, and at the end), so that the buffers freed while packing do not add up to the peak either."""
    stop = threading.Event()

    def release_until_stopped():
        releases = 0
        while not stop.wait(every):
            release_mapped_pages(path, while_loading)
            releases += 1
            if releases % TRIM_EVERY == 0:
                trim_heap()

    thread = threading.Thread(target=release_until_stopped, name="release-mapped-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        release_mapped_pages(path, while_loading)
        trim_heap()


def graph_name(port) -> str:
    """The ONNX graph's own name of an OpenVINO port; a port also carries its producer's names ("layers.0/...:0")."""
    return min(port.get_names(), key=lambda name: ("/" in name or ":" in name, name))


def format_entry(manifest: dict, backend: str) -> tuple[str, dict]:
    """The artifact format a backend reads and its manifest entry (graph files, weights file)."""
    if backend not in BACKENDS:
        raise UserError(f"{{backend}} must be one of {', '.join(BACKENDS)} (got {backend!r})", "backend")
    fmt = "onnx" if backend == "onnxruntime" else "openvino"
    entry = manifest["formats"].get(fmt)
    if entry is None:
        raise UserError(f"this artifact has no {fmt} graphs (it has: {', '.join(manifest['formats'])}); "
                        f"re-export it with `dg-export --format {fmt}` or choose another {{backend}}", "backend")
    return fmt, entry


def open_graph(folder: Path, manifest: dict, backend: str, device: str = "CPU", threads: int | None = None,
               precision: str | None = None, cache_dir: Path | None = None, graph: str = "model"):
    """Open a graph of an artifact on a backend, and check its inputs against the manifest."""
    fmt, entry = format_entry(manifest, backend)
    if backend == "onnxruntime":
        if device.upper() != "CPU":
            raise BackendUnavailable(f"the onnxruntime backend runs on CPU only here (asked for {device}); choose "
                                     "{backend} openvino", "onnxruntime", device)
        session = OnnxRuntimeGraph(folder / entry["graphs"][graph], threads)
    else:
        session = OpenVinoGraph(folder / entry["graphs"][graph], folder / entry["weights"], device, precision,
                                manifest["openvino"]["inference_precision"], threads, cache_dir)
    # the KV cache as state and static shapes are the model graph's (the vision graph is plain)
    model, settings = manifest["model"], manifest["openvino"] if fmt == "openvino" and graph == "model" else {}
    if settings.get("kv_state"):  # its inputs are the stateless graph's, the past taken into the state
        session = KVState(session, model["kv_layout"], model["sliding_window"])
    expected = [i["name"] for i in manifest["graphs"][graph]["inputs"]]
    if sorted(session.input_names) != sorted(expected):
        raise ArtifactError(f"{fmt} graph {graph} has inputs {session.input_names}, the manifest lists {expected}: "
                            "the artifact is inconsistent; re-export it", folder)
    return StaticShapes(session, settings["static"], model["kv_layout"]) if settings.get("static") else session
