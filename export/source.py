"""Find a DiffusionGemma checkpoint (local folder or hub id), check it, and load it with safetensors only."""

import json
from pathlib import Path

from dg_runtime.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = ("generation_config.json", "chat_template.jinja", "special_tokens_map.json")


def resolve(model: str, need_weights: bool = True, local_only: bool = False) -> Path:
    """A local folder holding the checkpoint; a hub id is downloaded (config, tokenizer, safetensors only)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{model} is a file; pass the folder that holds config.json and the safetensors")
        return path
    if local_only:
        raise UserError(f"folder {model} does not exist; give a folder that holds a DiffusionGemma config.json")
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise UserError(f"model folder {model} does not exist (and it is not a hub id like 'google/NAME')")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.jinja"] + (["*.safetensors"] if need_weights else [])
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as exc:  # network, auth, unknown repo: all the user's to fix
        raise UserError(f"could not download {model} from the hub ({type(exc).__name__}); "
                        "pass a local checkpoint folder instead") from None


def read_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no config.json: it is not a transformers checkpoint folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc})") from None
    if config.get("model_type") != "diffusion_gemma":
        raise UserError(f"{config_path} has model_type {config.get('model_type')!r}; dg-export only exports "
                        "'diffusion_gemma' checkpoints")
    return config


def check_files(folder: Path) -> None:
    """Refuse a checkpoint we cannot export faithfully, before any slow work starts."""
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder} lacks tokenizer files {', '.join(missing)}; the runtime needs them to encode prompts")
    if not list(folder.glob("*.safetensors")):
        if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
            raise UserError(f"{folder} holds only pickled weights (.bin/.pt); dg-export loads safetensors only "
                            "(convert them with safetensors first)")
        raise UserError(f"{folder} has no *.safetensors weights")


def load_config(folder: Path):
    from transformers import DiffusionGemmaConfig

    return DiffusionGemmaConfig.from_pretrained(folder)


def load_model(folder: Path):
    """The transformers model in fp32 eval mode: the oracle the graphs are validated against."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging

    # transformers' loading bar and load report (which lists the vision tower's tensors of a text-only
    # checkpoint as missing) are not the user's business here.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()
    return model.eval()
