"""dg-quantize ARTIFACT -o OUT --weight-format int8 | --recipe NAME: quantize an fp32/fp16 artifact (no checkpoint
needed); dg-quantize --report ARTIFACT: print a quantized artifact's quality report again.

Quantizing runs dg-export with the artifact as its source, so the options, checks and output are dg-export's.
"""

import argparse
import sys
from pathlib import Path

from dg_runtime.errors import UserError, run_cli

from .quality import REPORT_FILE, format_report, read_report
from .source import is_artifact


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="dg-quantize", allow_abbrev=False,
        description="Quantize an fp32/fp16 artifact (the options are dg-export's: -o, --recipe, --weight-format, "
                    "--group-size, --sym, --format, --overwrite, --no-validate), or print a quality report.")
    parser.add_argument("artifact", type=Path, help="an artifact folder written by dg-export")
    parser.add_argument("--report", action="store_true", help="print the artifact's quality report and exit")
    args, export_args = parser.parse_known_args(argv)
    if args.report:
        return run_cli("dg-quantize", lambda: print_report(args.artifact))
    if not ({"--recipe", "--weight-format"} & {a.split("=")[0] for a in export_args}):
        parser.error("say what to quantize to: --weight-format int8|int4 or --recipe NAME")
    if not is_artifact(args.artifact):
        return run_cli("dg-quantize", lambda: refuse(f"{args.artifact} is not an artifact folder (no manifest.json); "
                                                     "dg-export quantizes checkpoints"))
    from dg_export.cli import main as dg_export

    return dg_export([str(args.artifact), *export_args], prog="dg-quantize")


def refuse(message: str):
    raise UserError(message)


def print_report(artifact: Path) -> None:
    if not (artifact / REPORT_FILE).is_file():
        raise UserError(f"{artifact} has no {REPORT_FILE}: only quantized artifacts exported with validation have one")
    print(format_report(read_report(artifact)))


if __name__ == "__main__":
    sys.exit(main())
