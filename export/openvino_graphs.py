"""Convert the ONNX graphs to OpenVINO IR and make both IR files read one shared weights file."""

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import openvino as ov

WEIGHTS_FILE = "weights.bin"
ALIGNMENT = 64


def convert(onnx_path: Path, xml_path: Path) -> None:
    """ONNX -> IR, keeping fp32 weights (the default would compress them to fp16)."""
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)


def share_weights(folder: Path, xml_files: list[str]) -> None:
    """Point every Const of every IR at one deduplicated copy of its bytes in WEIGHTS_FILE.

    IR constants are (offset, size) slices of the model's .bin; rewriting them against a merged file keeps one
    copy of the tied weights on disk, and OpenVINO maps that file once.
    """
    offsets: dict[str, int] = {}
    with open(folder / WEIGHTS_FILE, "wb") as weights:
        for name in xml_files:
            xml_path = folder / name
            own_bin = (folder / name).with_suffix(".bin").read_bytes()
            tree = ET.parse(xml_path)
            for data in tree.getroot().iter("data"):
                if "offset" not in data.attrib or "size" not in data.attrib:
                    continue
                start, size = int(data.attrib["offset"]), int(data.attrib["size"])
                chunk = own_bin[start : start + size]
                key = hashlib.sha256(chunk).hexdigest()
                if key not in offsets:
                    weights.write(b"\0" * (-weights.tell() % ALIGNMENT))
                    offsets[key] = weights.tell()
                    weights.write(chunk)
                data.set("offset", str(offsets[key]))
            tree.write(xml_path, encoding="utf-8", xml_declaration=True)
            xml_path.with_suffix(".bin").unlink()
