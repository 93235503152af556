"""dg_export: DiffusionGemma's encoder and denoiser as one ONNX / OpenVINO graph, streamed from a checkpoint at a
recipe's precision and validated against transformers.

    from dg_export import export
    export("path/to/checkpoint", "model.dg", recipe="cpu-int4-mixed")
"""

__version__ = "0.1.0"

from .pipeline import export, plan  # noqa: E402  (the version first: the pipeline records it)

__all__ = ["export", "plan", "__version__"]
