"""dg-export: DiffusionGemma's encoder and denoiser as ONNX and OpenVINO graphs, validated against transformers."""

__version__ = "0.1.0"
