"""dg-run ARTIFACT [PROMPT]: generate with an exported DiffusionGemma, streaming text as blocks commit."""

import argparse
import json
import sys
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

from .backends import BACKENDS
from .errors import UserError, run_cli
from . import load
from .generate import DiffusionGemma, Draft, TextDelta, check_runtime_options


# runtime setting -> dg-run's flag, to word the runtime's errors (dg-serve shares the ones it has)
FLAGS = {"max_new_tokens": "-n/--max-new-tokens", "max_denoising_steps": "--steps", "entropy_bound": "--entropy-bound",
         "t_max": "--t-max", "t_min": "--t-min", "stability_threshold": "--stability-threshold",
         "confidence_threshold": "--confidence-threshold", "threads": "-t/--threads", "seed": "-s/--seed",
         "precision": "--precision", "backend": "--backend", "device": "--device", "raw": "--raw",
         "system": "--system", "images": "--image", "cache_dir": "--cache-dir", "fast": "--fast",
         "freeze_after": "--freeze-after", "refresh_every": "--refresh-every"}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="dg-run", description="Run an exported DiffusionGemma artifact.",
                                     allow_abbrev=False)
    parser.add_argument("artifact", type=Path, help="artifact folder written by dg-export")
    parser.add_argument("prompt", nargs="?", help="the prompt (or use -p / -f)")
    parser.add_argument("-p", "--prompt", dest="prompt_option", metavar="PROMPT", help="the prompt")
    parser.add_argument("-f", "--prompt-file", type=Path, help="read the prompt from a UTF-8 file")
    parser.add_argument("--image", dest="images", action="append", type=Path, metavar="FILE",
                        help="an image before the prompt's text (repeat for several; the artifact needs a vision "
                             "tower)")
    parser.add_argument("--system", help="system message for the chat template")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    parser.add_argument("--backend", help=f"one of {', '.join(BACKENDS)} (default: onnxruntime if the artifact has "
                        "ONNX graphs, else openvino)")
    parser.add_argument("--device", default="CPU", help="OpenVINO device: CPU, GPU, NPU or AUTO (default CPU)")
    parser.add_argument("-t", "--threads", type=int, help="CPU threads (default: the backend's choice)")
    parser.add_argument("--precision", choices=["f32", "bf16", "f16"],
                        help="OpenVINO CPU inference precision (default: the artifact's, f32 for fp32 exports)")
    parser.add_argument("-s", "--seed", type=int, default=0, help="seed of all sampling noise (default 0)")
    parser.add_argument("-n", "--max-new-tokens", type=int)
    parser.add_argument("--steps", dest="max_denoising_steps", type=int, help="max denoising steps per block")
    parser.add_argument("--entropy-bound", type=float)
    parser.add_argument("--t-max", type=float)
    parser.add_argument("--t-min", type=float)
    parser.add_argument("--stability-threshold", type=int)
    parser.add_argument("--confidence-threshold", type=float)
    parser.add_argument("--fast", action="store_true", default=None,
                        help="fast mode: freeze settled positions and compute only the others (not token-exact)")
    parser.add_argument("--freeze-after", type=int, help="fast mode: steps in a row a position's argmax must hold "
                        "before it freezes with it (default 2)")
    parser.add_argument("--refresh-every", type=int, help="fast mode: run the whole canvas every N steps (default 0: "
                        "never)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and stats")
    parser.add_argument("--visual", action="store_true", help="redraw the canvas at every denoising step")
    parser.add_argument("--cache-dir", type=Path, help="OpenVINO's model cache: the first start writes the compiled "
                        "model there (about the weights' size), later starts read it instead of compiling")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the artifact files")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('dg-edge')}")
    return parser.parse_intermixed_args(argv)  # options and the prompt in any order


def read_prompt(args) -> str:
    given = [name for name, value in (("a prompt argument", args.prompt), ("-p/--prompt", args.prompt_option),
                                      ("-f/--prompt-file", args.prompt_file)) if value is not None]
    if len(given) > 1:
        raise UserError(f"give the prompt once: {' and '.join(given)} were both given")
    if args.prompt_option is not None:
        return args.prompt_option
    if args.prompt_file is not None:
        try:
            return args.prompt_file.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise UserError(f"prompt file {args.prompt_file} does not exist") from None
        except IsADirectoryError:
            raise UserError(f"prompt file {args.prompt_file} is a folder; give the file to read") from None
        except OSError as exc:
            raise UserError(f"prompt file {args.prompt_file} cannot be read ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"prompt file {args.prompt_file} is not valid UTF-8 (byte {exc.start}); "
                            "save it as UTF-8") from None
    if args.prompt is None:
        raise UserError("no prompt: give one as an argument, with -p/--prompt or with -f/--prompt-file")
    return args.prompt


def printable(text: str, keep: str = "\n\t") -> str:
    """Model output with control characters (escape sequences among them) shown as '·', not sent to the terminal."""
    return "".join(c if c.isprintable() or c in keep else "·" for c in text)


def render_canvas(model: DiffusionGemma, draft: Draft) -> str:
    """The argmax canvas as text, accepted positions in bold, for --visual."""
    pieces = []
    for token, accepted in zip(draft.canvas[0], draft.accepted[0]):
        text = printable(model.text.decode([token]).replace("\n", "⏎"), keep="") or "·"
        pieces.append(f"\x1b[1m{text}\x1b[0m" if accepted else f"\x1b[2m{text}\x1b[0m")
    return "".join(pieces)


def run(args) -> int:
    prompt = read_prompt(args)
    if not prompt.strip():
        raise UserError("the prompt is empty; give some text to start from")
    check_runtime_options(args.backend, args.threads, args.precision, args.seed, args.cache_dir)
    model = load(args.artifact, backend=args.backend, device=args.device, threads=args.threads,
                 precision=args.precision, verify=not args.no_verify, memory_upkeep=True,
                 cache_dir=args.cache_dir)
    settings = model.defaults.with_overrides(
        max_new_tokens=args.max_new_tokens, max_denoising_steps=args.max_denoising_steps,
        entropy_bound=args.entropy_bound, t_max=args.t_max, t_min=args.t_min,
        stability_threshold=args.stability_threshold, confidence_threshold=args.confidence_threshold,
        fast=args.fast, freeze_after=args.freeze_after, refresh_every=args.refresh_every,
    )
    images = model.open_images(args.images or [])
    ids = model.prompt_ids(prompt, system=args.system, raw=args.raw, images=images)
    shown = ""
    for event in model.stream_text(prompt, system=args.system, raw=args.raw, settings=settings, seed=args.seed,
                                   images=images):
        if isinstance(event, Draft) and args.visual:
            sys.stdout.write(f"\x1b[H\x1b[2J{shown}\n\n[block {event.block + 1}, step {event.step}]\n"
                             f"{render_canvas(model, event)}\n")
            sys.stdout.flush()
        elif isinstance(event, TextDelta):
            shown += printable(event.text)
            if not args.json and not args.visual:
                sys.stdout.write(printable(event.text))
                sys.stdout.flush()
    stats = event.stats
    if args.json:
        print(json.dumps({"prompt_tokens": len(ids), "tokens": event.tokens[0].tolist(), "text": event.text,
                          "finish_reason": event.finish_reason, "stats": asdict(stats)}))
    else:
        if args.visual:
            sys.stdout.write(f"\x1b[H\x1b[2J{shown}")
        print(flush=True)
        print(f"\n[{stats.blocks} block(s), steps per block {stats.steps_per_block}, "
              f"{stats.tokens_per_forward:.2f} tokens/forward, load {stats.load_ms:.0f} ms, "
              f"prefill {stats.prefill_ms:.1f} ms, {stats.step_ms:.1f} ms/step, {stats.tokens_per_second:.1f} tokens/s"
              f"{f', fast: {stats.canvas_computed:.0%} of the canvas computed' if settings.fast else ''}]",
              file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli("dg-run", lambda: run(args), FLAGS)


if __name__ == "__main__":
    sys.exit(main())
