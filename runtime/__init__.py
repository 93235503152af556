"""dg_runtime: DiffusionGemma's block-diffusion loop on ONNX Runtime or OpenVINO, with numpy and a tokenizer.

    from dg_runtime import DiffusionGemma, Chat
    model = DiffusionGemma("tiny.dg", backend="openvino")
    chat = Chat(model)
    for event in chat.stream("Why is the sky blue?"):
        ...
"""

from .errors import UserError
from .generate import Block, Chat, DiffusionGemma, Done, Draft, Settings, Stats
from .noise import NoiseSource

__all__ = ["Block", "Chat", "DiffusionGemma", "Done", "Draft", "NoiseSource", "Settings", "Stats", "UserError"]
