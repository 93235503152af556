"""The exporter's command lines over `dg_export.export`:

    dg-export [MODEL] -o OUT [--recipe R] [--weight-format F] ...   export a checkpoint
    dg-quantize ARTIFACT -o OUT --weight-format int8|int4 ...        quantize an fp32/fp16 artifact (no checkpoint)
    dg-quantize --report ARTIFACT                                    print a quantized artifact's quality report
"""

import argparse
import sys
from pathlib import Path

from dg_quantize.roles import DEFAULT_GROUP, VISION_FORMATS
from dg_quantize.schemes import FORMATS as WEIGHT_FORMATS
from dg_runtime.errors import UserError, run_cli

from . import __version__
from .builtin import BUILTIN_ID
from .recipes import DEFAULT_RECIPE

FORMATS = {"onnx": ["onnx"], "openvino": ["openvino"], "both": ["onnx", "openvino"]}
# export() argument -> the flag, to word the exporter's errors
FLAGS = {"output": "-o/--output", "overwrite": "--overwrite", "validation": "--validation", "formats": "--format",
         "weight_format": "--weight-format", "group_size": "--group-size", "ratio": "--ratio", "recipe": "--recipe",
         "vision_weight_format": "--vision-weight-format"}
EXPORT_MODULES = ("torch", "transformers", "onnx", "onnxscript", "safetensors")


def parse_args(argv, prog: str = "dg-export"):
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Export a DiffusionGemma checkpoint (hub id or local folder) to ONNX and/or OpenVINO.",
        allow_abbrev=False,
    )
    parser.add_argument("model", nargs="?", default=BUILTIN_ID,
                        help=f"hub id, checkpoint folder or fp32/fp16 artifact folder (default: {BUILTIN_ID}, the "
                             "embedded tiny model); synthetic:FOLDER streams random weights of the shape in "
                             "FOLDER/config.json")
    add_output_options(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the plan from config.json alone and exit")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser.parse_intermixed_args(argv)


def add_output_options(parser) -> None:
    """The options dg-export and dg-quantize share."""
    parser.add_argument("-o", "--output", type=Path, help="artifact folder to write (default: ./<model name>.dg)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help=f"target preset from recipes/ or a .json path (default {DEFAULT_RECIPE})")
    parser.add_argument("--format", choices=sorted(FORMATS), help="graph formats (default: the recipe's)")
    quant = parser.add_argument_group("weights (override the recipe's)")
    quant.add_argument("--weight-format", choices=WEIGHT_FORMATS,
                       help="fp32/fp16 for every matrix; int8: int8 matrices (router fp32); int4: int4 attention, "
                            "MLPs and experts, int8 embedding/LM head, fp32 router")
    quant.add_argument("--group-size", type=int, help=f"int4 group size, a power of two >= 16 (default "
                                                      f"{DEFAULT_GROUP}; narrowed per tensor to divide its width), "
                                                      "or -1 for one group a row (per channel; OpenVINO only)")
    quant.add_argument("--ratio", type=float, help="share of the int4 weights stored int4 (default 1); the rest, "
                                                   "the tensors int4 changes most, at int8")
    quant.add_argument("--sym", action="store_true", default=None,
                       help="symmetric int4 (no zero points; what NPUs ask for); default asymmetric")
    quant.add_argument("--vision-weight-format", choices=VISION_FORMATS,
                       help="the vision tower's matrices (default fp32; int8: per output channel, a quarter of "
                            "their bytes; its cost in the quality report)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    parser.add_argument("--text-only", action="store_true",
                        help="leave the vision tower out (exported by default when the checkpoint has one)")
    parser.add_argument("--validation", choices=["auto", "full", "by-layer"], default="auto",
                        help="compare with transformers as a whole model, or one layer at a time in bounded memory "
                             "(auto: full where it fits in 4 GB)")
    parser.add_argument("--no-validate", action="store_true", help="skip the comparison with transformers")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="validation's floor for |graph - transformers| / (1 + |transformers|) against float64 "
                             "transformers; a graph may also be within 4x float32 transformers' own error "
                             "(default 1e-4)")


def check_export_extra() -> None:
    """dg-export needs the [export] extra; without it, one line instead of an ImportError."""
    from importlib.util import find_spec

    missing = [name for name in EXPORT_MODULES if find_spec(name) is None]
    if missing:
        raise UserError(f"exporting needs the [export] extra ({', '.join(missing)} missing): "
                        "pip install 'dg-edge[export]'")


def export_from_args(args, model: str) -> None:
    check_export_extra()
    from .pipeline import export

    export(model, args.output, recipe=args.recipe, formats=FORMATS[args.format] if args.format else None,
           weight_format=args.weight_format, group_size=args.group_size, sym=args.sym, ratio=args.ratio,
           vision_weight_format=args.vision_weight_format,
           overwrite=args.overwrite, text_only=args.text_only,
           validation=None if args.no_validate else args.validation, atol=args.atol)


def run_export(args) -> None:
    if args.dry_run:
        check_export_extra()
        from .pipeline import plan

        plan(args.model, FORMATS[args.format] if args.format else ("onnx", "openvino"))
        return
    export_from_args(args, args.model)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli("dg-export", lambda: run_export(args), FLAGS)


def quantize_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="dg-quantize", allow_abbrev=False,
        description="Quantize an fp32/fp16 artifact without its checkpoint (the options are dg-export's), or print "
                    "a quantized artifact's quality report.")
    parser.add_argument("artifact", type=Path, help="an artifact folder written by dg-export")
    parser.add_argument("--report", action="store_true", help="print the artifact's quality report and exit")
    add_output_options(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_intermixed_args(argv)
    if not args.report and args.weight_format is None and args.recipe == DEFAULT_RECIPE:
        parser.error("say what to quantize to: --weight-format int8|int4 or --recipe NAME")
    if not args.report and args.output is None:
        parser.error("say where to write the quantized artifact: -o OUT")
    return run_cli("dg-quantize", lambda: run_quantize(args), FLAGS)


def run_quantize(args) -> None:
    from dg_quantize.quality import REPORT_FILE, format_report, read_report
    from dg_runtime.artifact import MANIFEST_NAME

    if not (args.artifact / MANIFEST_NAME).is_file():
        raise UserError(f"{args.artifact} is not an artifact folder (no {MANIFEST_NAME}); dg-export quantizes "
                        "checkpoints")
    if args.report:
        if not (args.artifact / REPORT_FILE).is_file():
            raise UserError(f"{args.artifact} has no {REPORT_FILE}: only quantized artifacts exported with "
                            "validation have one")
        print(format_report(read_report(args.artifact)))
        return
    export_from_args(args, str(args.artifact))


if __name__ == "__main__":
    sys.exit(main())
