"""Load test: N concurrent streaming clients against a dg-serve process for a fixed time.

    python -m dg_serve.loadtest ARTIFACT [--backend B] [--clients 8] [--seconds 60]

Starts `dg-serve` on a free port, computes every (prompt, seed)'s answer with `DiffusionGemma.generate` in this
process (serial runs), sends each once through the server (warm-up), then lets the clients stream requests for
`--seconds`. Prints requests, failures, answers that differ from the serial runs, latency p50/p95 and the server's
RSS after the warm-up and at the end. Exits 1 on any failure or difference. Needs only the standard library.
"""

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from dg_runtime import DiffusionGemma

from .cli import bind

# The demo model's tasks (export/demo/tasks.py): one- and two-canvas answers.
PROMPTS = ["greet: alice", "greet: bruno", "upper: kqztabcd", "next: abcdefgh", "upper: mnbvcxzl",
           "shout: " + "abcdefghij" * 4, "next: qwertyui", "greet: chloe"]
SEEDS_PER_PROMPT = 2


def request_stream(port: int, prompt: str, seed: int) -> tuple[str, float]:
    """One streaming chat request; returns the answer's text and its latency in seconds."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"messages": [{"role": "user", "content": prompt}], "seed": seed, "stream": True}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read().decode(errors='replace')}")
    text, finished = [], False
    for line in response:
        line = line.decode().strip()
        if line == "data: [DONE]":
            finished = True
            break
        if line.startswith("data: "):
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            text += [c["delta"].get("content") or "" for c in chunk["choices"]]
    connection.close()
    if not finished:
        raise RuntimeError("the stream ended without [DONE]")
    return "".join(text), time.perf_counter() - started


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def wait_until_serving(server: subprocess.Popen, port: int, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"dg-serve exited: {server.stderr.read().decode(errors='replace')}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("dg-serve did not start")


def load_test(artifact: Path, backend: str, clients: int = 8, seconds: float = 60) -> dict:
    model = DiffusionGemma(artifact, backend=backend)
    cases = [(prompt, seed) for prompt in PROMPTS for seed in range(SEEDS_PER_PROMPT)]
    expected = {}
    for prompt, seed in cases:
        done = model.generate([model.text.chat_ids([{"role": "user", "content": prompt}])], seed=seed)
        expected[prompt, seed] = model.text.decode(model.reply(done.tokens[0]))
    del model

    listener = bind("127.0.0.1", 0)
    port = listener.getsockname()[1]
    listener.close()
    server = subprocess.Popen([sys.executable, "-m", "dg_serve.cli", str(artifact), "--backend", backend,
                               "--port", str(port), "--queue-size", str(clients)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_serving(server, port)
        for prompt, seed in cases:
            request_stream(port, prompt, seed)
        rss_before = rss_mb(server.pid)
        latencies, failures, different = [], [], []
        deadline = time.monotonic() + seconds

        def client(index: int) -> None:
            turn = index
            while time.monotonic() < deadline:
                prompt, seed = cases[turn % len(cases)]
                turn += clients
                try:
                    text, latency = request_stream(port, prompt, seed)
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    failures.append(f"{prompt!r} seed {seed}: {exc}")
                    continue
                latencies.append(latency)
                if text != expected[prompt, seed]:
                    different.append(f"{prompt!r} seed {seed}: {text!r} != {expected[prompt, seed]!r}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        rss_after = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"backend": backend, "clients": clients, "seconds": elapsed, "requests": len(latencies) + len(failures),
            "failed": failures, "different": different,
            "p50_s": float(np.percentile(latencies, 50)) if latencies else float("nan"),
            "p95_s": float(np.percentile(latencies, 95)) if latencies else float("nan"),
            "rss_before_mb": rss_before, "rss_after_mb": rss_after}


def report(result: dict) -> str:
    growth = result["rss_after_mb"] / result["rss_before_mb"] - 1
    return (f"| {result['backend']} | {result['clients']} | {result['seconds']:.0f} | {result['requests']} | "
            f"{result['requests'] / result['seconds']:.1f} | {len(result['failed'])} | {len(result['different'])} | "
            f"{result['p50_s'] * 1000:.0f} | {result['p95_s'] * 1000:.0f} | {result['rss_before_mb']:.0f} -> "
            f"{result['rss_after_mb']:.0f} ({growth:+.1%}) |")


HEADER = ("| backend | clients | s | requests | req/s | failed | differ from serial | p50 ms | p95 ms | "
          "server RSS MB after warm-up -> end |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dg_serve.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--backend", action="append", help="repeat for several (default: onnxruntime and openvino)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args(argv)
    results = [load_test(args.artifact, backend, args.clients, args.seconds)
               for backend in args.backend or ["onnxruntime", "openvino"]]
    print(HEADER)
    for result in results:
        print(report(result))
        for problem in result["failed"][:5] + result["different"][:5]:
            print(f"  {result['backend']}: {problem}")
    return 1 if any(r["failed"] or r["different"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
