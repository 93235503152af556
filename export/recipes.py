"""Named export targets. A recipe is a JSON file in recipes/ (or any path): graph formats, weight precision (one
format, or one per tensor role: see dg_quantize.roles) and the runtime settings the artifact records for the
runtime to apply."""

import json
from importlib import resources
from pathlib import Path

from dg_quantize.roles import Precision
from dg_runtime.errors import UserError

DEFAULT_RECIPE = "cpu-fp32"
KEYS = {"description", "formats", "weights", "openvino"}


def available() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in resources.files("dg_recipes").iterdir()
                  if p.name.endswith(".json"))


def load_recipe(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        text, name = path.read_text(), path.stem
    elif name_or_path in available():
        text, name = (resources.files("dg_recipes") / f"{name_or_path}.json").read_text(), name_or_path
    else:
        raise UserError(f"unknown recipe {name_or_path!r}; choose one of {', '.join(available())} or pass a .json file")
    try:
        recipe = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"recipe {name_or_path} is not valid JSON ({exc})") from None
    if set(recipe) != KEYS:
        raise UserError(f"recipe {name_or_path} must have exactly the keys {sorted(KEYS)}")
    Precision(recipe["weights"], where=f"recipe {name_or_path}")  # says what is wrong with its weights entry
    if not set(recipe["formats"]) <= {"onnx", "openvino"}:
        raise UserError(f"recipe {name_or_path} lists unknown formats {recipe['formats']}")
    if recipe["openvino"].get("moe", "sorted") not in ("sorted", "tiled"):
        raise UserError(f"recipe {name_or_path}: openvino.moe must be 'sorted' or 'tiled' (got "
                        f"{recipe['openvino']['moe']!r})")
    static = recipe["openvino"].get("static")
    if static is not None and (set(recipe["formats"]) != {"openvino"} or recipe["openvino"].get("moe") != "tiled"
                               or not isinstance(static, dict) or not set(static) <= {"prompt_chunk", "kv_capacity"}):
        raise UserError(f"recipe {name_or_path}: openvino.static (fixed shapes: prompt_chunk, kv_capacity) needs "
                        "formats [\"openvino\"] and openvino.moe \"tiled\" (the sorted MoE's shapes follow the routing)")
    kv_state = recipe["openvino"].get("kv_state", False)
    if not isinstance(kv_state, bool) or kv_state and static is not None:
        raise UserError(f"recipe {name_or_path}: openvino.kv_state (the KV cache as OpenVINO state) must be true or "
                        "false, and false with openvino.static (the static form takes the cache as padded inputs)")
    return {"name": name, **recipe}
