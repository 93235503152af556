"""First and second start of an artifact on OpenVINO with and without its model cache (`--cache-dir`), each in a
fresh process: load (compile) and the first generation (the first runs pack the weights).

    python bench/startup.py ARTIFACT [--threads 2]

Rows: no cache; a cache folder's first start (it compiles and writes the cache); its second start (it reads it).
Also the cache's size on disk.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

START = """
import sys, time
import numpy as np
from dg_runtime import Settings, load
started = time.perf_counter()
model = load(sys.argv[1], backend="openvino", threads=int(sys.argv[2]), cache_dir=sys.argv[3] or None)
loaded = time.perf_counter()
model.generate(np.arange(5, 45)[None] % model.vocab_size, settings=Settings(max_new_tokens=model.canvas_length,
               max_denoising_steps=4), seed=0)
print(loaded - started, time.perf_counter() - loaded)
"""


def start(artifact: Path, threads: int, cache: str) -> tuple[float, float]:
    result = subprocess.run([sys.executable, "-c", START, str(artifact), str(threads), cache], capture_output=True,
                            text=True, check=True)
    load, first = map(float, result.stdout.split())
    return load, first


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/startup.py")
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cache = Path(tempfile.mkdtemp(prefix="dg-ov-cache-"))
    try:
        rows = [("no cache", *start(args.artifact, args.threads, "")),
                ("cache, first start", *start(args.artifact, args.threads, str(cache))),
                ("cache, second start", *start(args.artifact, args.threads, str(cache)))]
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"\n{args.artifact.name}, OpenVINO CPU, {args.threads} threads; cache {size / 1e6:.0f} MB on disk\n")
    print("| start | load (s) | first generation, 4 steps (s) | total (s) |")
    print("|---|---:|---:|---:|")
    for name, load, first in rows:
        print(f"| {name} | {load:.1f} | {first:.1f} | {load + first:.1f} |")


if __name__ == "__main__":
    main()
