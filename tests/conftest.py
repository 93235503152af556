"""Tiny DiffusionGemma checkpoints built from configs, exported once per test session."""

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from dg_export.builtin import build_checkpoint
from dg_export import export

BASE = {
    "vocab_size": 264, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 32, "global_head_dim": 64, "num_global_key_value_heads": 1,
    "moe_intermediate_size": 32,
}
# Each config stresses a different corner: a window smaller or larger than the prompts, top-1 and top-2 routing,
# grouped KV heads, full layers with one KV head (K=V) or two.
CONFIGS = {
    "window8-top2": ({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8,
                      "num_experts": 4, "top_k_experts": 2}, 32),
    "window64-top1": ({"layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                       "sliding_window": 64, "num_experts": 4, "top_k_experts": 1, "num_key_value_heads": 2}, 16),
    "gqa-window12": ({"layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                      "sliding_window": 12, "num_experts": 6, "top_k_experts": 2, "num_attention_heads": 4,
                      "num_key_value_heads": 2}, 32),
    "fullkv2-window5": ({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 5,
                         "num_experts": 8, "top_k_experts": 2, "num_attention_heads": 4,
                         "num_global_key_value_heads": 2}, 24),
}


CONFIDENT_EMBEDDING_STD = float(os.environ.get("DG_TEST_EMBEDDING_STD", "0.3"))


def make_checkpoint(folder: Path, name: str, confident: bool = False) -> Path:
    """A seeded tiny checkpoint. A `confident` one has a larger tied embedding, so its distributions are peaked and
    token parity is not decided by float near-ties."""
    overrides, canvas = CONFIGS[name]
    return build_checkpoint(folder, {**BASE, **overrides, "num_hidden_layers": len(overrides["layer_types"])},
                            canvas_length=canvas, embedding_std=CONFIDENT_EMBEDDING_STD if confident else None)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(name, confident) -> (checkpoint folder, artifact folder); each is built and exported once.

    Standard-init exports are validated by dg-export at atol 1e-4; confident ones are checked by exact token
    parity in the generation tests instead.
    """
    cache = {}

    def get(name: str, confident: bool = False):
        if (name, confident) not in cache:
            root = tmp_path_factory.mktemp(name)
            checkpoint = make_checkpoint(root / "checkpoint", name, confident)
            artifact = root / "artifact.dg"
            export(checkpoint, artifact, validation=None if confident else "auto")
            cache[name, confident] = checkpoint, artifact
        return cache[name, confident]

    return get


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory):
    """The embedded demo model exported as the README's main command does (validated)."""
    artifact = tmp_path_factory.mktemp("demo") / "demo.dg"
    export(output=artifact)
    return artifact


@pytest.fixture(scope="session")
def hf_model():
    cache = {}

    def get(checkpoint: Path):
        if checkpoint not in cache:
            import torch
            from transformers import DiffusionGemmaForBlockDiffusion

            cache[checkpoint] = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, dtype=torch.float32).eval()
        return cache[checkpoint]

    return get


@contextmanager
def serving(model, **options):
    """dg-serve's app on a free local port, in this process; yields its base URL."""
    import uvicorn

    from dg_serve.app import create_app
    from dg_serve.cli import bind

    listener = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(model, "demo", **options), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def write_byte_fallback_bpe(folder: Path) -> Path:
    """A subword tokenizer as Gemma's is built (BPE, '▁' for spaces, unknown characters as <0xXX> byte tokens),
    trained here on the Python standard library's docstrings (ASCII: other characters take byte tokens)."""
    import inspect
    import json
    import textwrap

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    from dg_export.builtin import SPECIAL_TOKENS

    docs = [o.__doc__ for o in (str, list, dict, int, float, json, inspect, textwrap) if o.__doc__]
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS,
                                                            show_progress=False))
    spec = json.loads(tokenizer.to_str())
    for byte in range(256):  # ordinary vocabulary entries, as in Gemma's tokenizer (not special tokens)
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


def openvino_pairs(root: Path, recipe: dict) -> dict[str, tuple[Path, Path]]:
    """name -> (the dynamic, stateless OpenVINO artifact, the same exported with `recipe`) of the demo model and a
    held-out config; the demo's `recipe` export is validated against transformers in full."""
    recipe_file = root / "recipe.json"
    recipe_file.write_text(json.dumps(recipe))
    pairs = {}
    for name, source in (("demo", "builtin:tiny"), ("gqa-window12", make_checkpoint(root / "gqa", "gqa-window12", True))):
        plain = export(source, root / f"{name}-plain.dg", formats=["openvino"], validation=None)
        pairs[name] = plain, export(source, root / f"{name}-recipe.dg", recipe=str(recipe_file),
                                    validation="full" if name == "demo" else None)
    return pairs

