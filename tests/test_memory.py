"""Runtime memory: the weights held once, the backends' working memory bounded, mapped pages released safely."""

import subprocess
import sys

import numpy as np
import pytest

from dg_runtime.backends import PEAK_OVER_WEIGHTS, WORKING_BYTES, release_mapped_pages

FRESH_PROCESS = """
import sys
from dg_runtime import load
model = load(sys.argv[1], backend=sys.argv[2], memory_upkeep=True)  # as dg-run and dg-serve load
model.generate([[5, 6, 7, 8, 9, 10, 11, 12]], seed=0)
print([line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1])
"""
# Two artifacts of one shape but for the number of experts: the same activations, 7x the expert weights.
FAMILY = {"vocab_size": 16384, "hidden_size": 512, "intermediate_size": 1024, "top_k_experts": 2,
          "moe_intermediate_size": 512, "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"],
          "head_dim": 64, "global_head_dim": 128, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture(scope="module")
def expert_pairs(tmp_path_factory):
    from dg_export import export
    from dg_export.builtin import tiny_config
    from dg_export.synthetic import write_config

    root = tmp_path_factory.mktemp("memory")
    artifacts = {}
    for experts in (8, 56):
        write_config(root / f"e{experts}", tiny_config({**FAMILY, "num_experts": experts}, canvas_length=64))
        for recipe in ("cpu-fp32", "cpu-int4-mixed"):
            artifacts[recipe, experts] = export(f"synthetic:{root / f'e{experts}'}", root / f"{recipe}-{experts}.dg",
                                                recipe=recipe, validation=None)
    return artifacts


def peak_bytes(artifact, backend) -> int:
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(artifact), backend], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1]) * 1024


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("recipe", ["cpu-fp32", "cpu-int4-mixed"])
def test_peak_rss_is_what_the_memory_check_predicts(expert_pairs, backend, recipe):
    """A fresh process loads and generates: its peak stays within what the runtime's memory check predicts for the
    artifact (PEAK_OVER_WEIGHTS x weights + WORKING_BYTES), for a small and a 3-4x larger one of the same shape,
    and the larger one's extra weights are really held (at least half a byte of RSS per byte)."""
    small, large = expert_pairs[recipe, 8], expert_pairs[recipe, 56]
    weights = [(a / "model.bin").stat().st_size for a in (small, large)]
    peaks = [peak_bytes(a, backend) for a in (small, large)]
    factor = PEAK_OVER_WEIGHTS[backend, recipe != "cpu-fp32"]
    per_byte = (peaks[1] - peaks[0]) / (weights[1] - weights[0])
    print(f"\n{recipe} on {backend}: peaks {peaks[0] / 1e6:.0f} -> {peaks[1] / 1e6:.0f} MB for weights "
          f"{weights[0] / 1e6:.0f} -> {weights[1] / 1e6:.0f} MB ({per_byte:.2f} per byte; the check assumes {factor})")
    for peak, size in zip(peaks, weights):
        assert peak <= factor * size + WORKING_BYTES
    assert per_byte >= 0.5


def resident_file_kb(path) -> int:
    """Resident kB of this process's mappings of `path`."""
    total, current = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                current = len(fields) == 6 and fields[5] == str(path)
            elif current and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise: Linux")
@pytest.mark.parametrize("while_loading", [False, True], ids=["unmap", "page-out"])
def test_released_pages_come_back_from_the_file(tmp_path, while_loading):
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    assert int(mapped.sum()) == int(data.sum())  # every page read: resident
    assert resident_file_kb(path.resolve()) >= 8 << 10
    assert release_mapped_pages(path, while_loading) >= 8 << 20
    assert resident_file_kb(path.resolve()) < 1 << 10
    assert np.array_equal(mapped, data)  # read again from the file


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise: Linux")
@pytest.mark.parametrize("while_loading", [False, True], ids=["unmap", "page-out"])
def test_written_mappings_are_left_alone(tmp_path, while_loading):
    path = tmp_path / "weights.bin"
    np.zeros(1 << 20, dtype=np.uint8).tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writes stay in memory only
    mapped[:] = 7
    release_mapped_pages(path, while_loading)
    assert int(mapped.min()) == 7  # dropping these pages would have lost the writes


HEAP_WITH_A_HOLE = """
import ctypes
from dg_runtime.backends import trim_heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
blocks = [libc.malloc(64 << 10) for _ in range(4096)]  # 256 MB in blocks small enough to come from the heap
for block in blocks:
    ctypes.memset(block, 1, 64 << 10)
for block in blocks[:-1]:  # the last block keeps the heap's top: the freed 256 MB below it stay resident
    libc.free(block)
print(trim_heap())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trimming_the_heap_gives_freed_memory_back():
    result = subprocess.run([sys.executable, "-c", HEAP_WITH_A_HOLE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) >= 200e6


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_releasing_pages_while_loading_and_warming_up_keeps_the_tokens(demo_artifact, backend, monkeypatch):
    """The demo's weights are below the size that releases pages: force it, and compare with a load that does not."""
    import dg_runtime.graph

    from dg_runtime import DiffusionGemma

    prompt = [[5, 6, 7, 8, 9]]
    expected = DiffusionGemma(demo_artifact, backend=backend).generate(prompt, seed=3).tokens
    monkeypatch.setattr(dg_runtime.graph, "RELEASE_FROM_BYTES", 0)
    model = DiffusionGemma(demo_artifact, backend=backend, memory_upkeep=True)
    assert model.graph.weights_file is not None
    for _ in range(3):  # past the warm-up runs, which release pages too
        assert np.array_equal(model.generate(prompt, seed=3).tokens, expected)
