"""The embedded default model and the tiny checkpoints that tests and benchmarks build from configs.

`builtin:tiny` is the demo model trained by `python bench/train_demo.py` and shipped in
export/demo/checkpoint (config, safetensors, tokenizer). `build_checkpoint` writes seeded random checkpoints of
any shape, no network needed.
"""

import json
import os
from pathlib import Path

from dg_runtime.errors import UserError

BUILTIN_ID = "builtin:tiny"
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TEXT_CONFIG = {
    "vocab_size": 264,  # 5 special tokens + 256 bytes, rounded up
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "global_head_dim": 64,
    "num_global_key_value_heads": 1,
    "num_experts": 8,
    "top_k_experts": 2,
    "moe_intermediate_size": 64,
    "sliding_window": 64,
    "max_position_embeddings": 4096,
    "pad_token_id": 0,
    "eos_token_id": [1, 4],
    "bos_token_id": 2,
}
# A text-only model on purpose: DiffusionGemmaConfig(vision_config=None) would build a 168M-parameter tower.
TINY_VISION_CONFIG = {"model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
                      "position_embedding_size": 64, "patch_size": 4}
GENERATION_CONFIG = {
    "max_new_tokens": 256, "max_denoising_steps": 48, "t_max": 0.8, "t_min": 0.4,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "stability_threshold": 1, "confidence_threshold": 0.005,
    "eos_token_id": [1, 4], "pad_token_id": 0, "bos_token_id": 2,
}


DEMO_CHECKPOINT = Path(__file__).parent / "demo" / "checkpoint"


def cache_dir() -> Path:
    """Where benchmarks keep the stand-ins they build."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dg-edge"


def write_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer (every byte is a token) with Gemma-style turn markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE,
    }, indent=2))


def tiny_config(text_overrides: dict | None = None, canvas_length: int = 256):
    """A DiffusionGemmaConfig from TEXT_CONFIG (with overrides) and the tiny vision tower."""
    from transformers import DiffusionGemmaConfig

    return DiffusionGemmaConfig(text_config={**TEXT_CONFIG, **(text_overrides or {})},
                                vision_config=TINY_VISION_CONFIG, canvas_length=canvas_length)


def build_checkpoint(folder: Path, text_overrides: dict | None = None, canvas_length: int = 256, seed: int = 0,
                     embedding_std: float | None = None) -> Path:
    """Write a seeded random DiffusionGemma checkpoint (config, safetensors, tokenizer) into `folder`.

    A larger `embedding_std` (the tied embedding / lm_head only) gives peaked output distributions while the
    layers keep their small standard init, so the network stays well-conditioned.
    """
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    config = tiny_config(text_overrides, canvas_length)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    if embedding_std is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, embedding_std)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    write_tokenizer(folder)
    return folder


# the embedded models: builtin:NAME -> its checkpoint folder (bench/train_demo.py --model NAME trains it)
BUILTINS = {"builtin:tiny": DEMO_CHECKPOINT, "builtin:canvas256": DEMO_CHECKPOINT.parent / "canvas256"}


def builtin_checkpoint(model: str = BUILTIN_ID) -> Path:
    folder = BUILTINS[model]
    if not (folder / "config.json").is_file():
        raise UserError(f"the embedded checkpoint of {model} is missing from {folder}; reinstall dg-edge, or "
                        f"train it with `python bench/train_demo.py --model {model.removeprefix('builtin:')}` from a "
                        "clone")
    return folder
