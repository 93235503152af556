"""dg_runtime: DiffusionGemma's block-diffusion loop on ONNX Runtime or OpenVINO, with numpy and a tokenizer.

    import dg_runtime
    model = dg_runtime.load("tiny.dg")                      # backend="openvino", device="GPU", ...
    print(model.generate_text("greet: alice", seed=0))      # text in, text out
    chat = dg_runtime.Chat(model)
    for event in chat.stream("upper: sunshine"):            # Draft after each step, TextDelta, Done
        if isinstance(event, dg_runtime.TextDelta):
            print(event.text, end="")
"""

from pathlib import Path

from .errors import (ArtifactError, BackendUnavailable, NotEnoughMemory, PromptTooLong, SettingError,
                     UserError)
from .generate import Block, Chat, DiffusionGemma, Done, Draft, Settings, Stats, TextDelta
from .kv_cache import KVCache
from .noise import NoiseSource
from .streamer import TextStreamer
from .text import TextCodec


def load(path: str | Path, *, backend: str | None = None, device: str = "CPU", threads: int | None = None,
         precision: str | None = None, verify: bool = False, memory_upkeep: bool = False,
         cache_dir: str | Path | None = None) -> DiffusionGemma:
    """Open an artifact folder written by dg-export.

    backend: "onnxruntime" or "openvino" (default: onnxruntime if the artifact has ONNX graphs, else openvino).
    device: OpenVINO's device (CPU, GPU, NPU, AUTO). threads: CPU threads (default: the backend's choice).
    precision: OpenVINO CPU inference precision (f32, bf16, f16; default: what the artifact's recipe chose).
    verify: check every file's sha256 against the manifest (reads the whole weights file; sizes are always checked).
    memory_upkeep: run a thread while loading, and after runs at most once a second, that gives the process's
      freed heap back to the system (glibc malloc_trim) and drops the weights file's mapped pages the backend has
      copied (madvise). Process-wide side effects, off by default; dg-run and dg-serve turn them on (they keep the
      26B within 24 GB).
    cache_dir: OpenVINO's model cache folder: the first start writes the compiled model there (about the weights'
      size on disk), later starts of the same artifact and options read it instead of compiling (off by default).
    """
    return DiffusionGemma(path, backend=backend, device=device, threads=threads, precision=precision, verify=verify,
                          memory_upkeep=memory_upkeep, cache_dir=cache_dir)


__all__ = ["ArtifactError", "BackendUnavailable", "Block", "Chat", "DiffusionGemma", "Done", "Draft", "KVCache",
           "NoiseSource", "NotEnoughMemory", "PromptTooLong", "Settings", "SettingError", "Stats", "TextCodec",
           "TextDelta", "TextStreamer", "UserError", "load"]
