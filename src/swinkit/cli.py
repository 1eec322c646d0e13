"""The `swinkit` command. Each subcommand parses arguments and calls one importable function;
no logic lives here that the Python API lacks.

Exit status: 0 done; 2 an expected failure (a bad argument, file, config or checkpoint, a full
disk, a folder in use; `errors.EXPECTED_ERRORS`), told in one line that names it (`-v` adds the
traceback); 1 a bug, with its traceback and a request to report it; 130 Ctrl-C; `swinkit train`
stopped by SIGTERM / SIGINT after saving: 128 + the signal's number (143 / 130).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import signal
import sys
import threading
import traceback

import torch

from . import api
from .errors import EXPECTED_ERRORS
from .models.registry import STANDARD_MODELS, get_config, list_models
from .models.swin import SwinTransformer
from .weights import layouts


def model_info(name: str) -> dict:
    """Parameters, GMACs, resolution and windows of a registered variant (built on the meta device)."""
    config = get_config(name)
    with torch.device("meta"):
        model = SwinTransformer(config, name=name)
    return {
        "name": name,
        "version": config.version,
        "params_m": round(model.num_params() / 1e6, 2),
        "gmacs": round(model.flops() / 1e9, 2),
        "img_size": list(config.img_size),
        "window": config.window_size,
        "stage_windows": config.stage_windows(),
        "embed_dim": config.embed_dim,
        "depths": list(config.depths),
        "num_heads": list(config.num_heads),
        "num_classes": config.num_classes,
    }


def _cmd_info(args) -> int:
    names = [args.name] if args.name else list_models(args.pattern) if args.pattern else list(STANDARD_MODELS)
    rows = [model_info(n) for n in names]
    if args.json:
        import json
        print(json.dumps(rows if not args.name else rows[0], indent=2))
        return 0
    print(f"{'model':<36} {'ver':>3} {'params':>9} {'GMACs':>7} {'input':>9} {'window':>6}  stage windows")
    for row in rows:
        size = "x".join(map(str, row["img_size"]))
        print(f"{row['name']:<36} {'v' + str(row['version']):>3} {row['params_m']:>8.2f}M {row['gmacs']:>7.2f}"
              f" {size:>9} {row['window']:>6}  {row['stage_windows']}")
    return 0


def _cmd_list(args) -> int:
    print("\n".join(list_models(args.pattern)))
    return 0


def _cmd_convert(args) -> int:
    out = api.convert_checkpoint(args.src, args.dst, to=args.to, model=args.model)
    print(f"wrote {out} ({args.to} layout)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swinkit", description="Swin Transformer v1/v2 toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (resizes, layouts)")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="params, GMACs, resolution and window of a model (or all)")
    info.add_argument("name", nargs="?", help="model name (default: every standard variant)")
    info.add_argument("--pattern", help="wildcard over model names, e.g. 'swinv2_*'")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_cmd_info)

    lst = sub.add_parser("list", help="model names")
    lst.add_argument("pattern", nargs="?")
    lst.set_defaults(func=_cmd_list)

    convert = sub.add_parser("convert", help="convert a checkpoint between layouts")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to", required=True, choices=layouts.LAYOUTS)
    convert.add_argument("--model", help="model name, when the file does not say which variant it holds")
    convert.set_defaults(func=_cmd_convert)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Subcommands contributed by the other packages (train, eval, predict, export, bench, data)."""
    from .bench.cli import register as bench
    from .data.cli import register as data
    from .infer.cli import register as infer
    from .infer.cli_deploy import register as deploy
    from .train.cli import register as train
    return [train, infer, deploy, bench, data]


def describe_failure(error: BaseException) -> str | None:
    """The one-line message for an expected failure (see the module docstring); None for a bug."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        message = f"out of GPU memory ({str(error).splitlines()[0] if str(error) else 'CUDA'}); " \
                  "try a smaller --batch-size, --precision bf16-mixed or --memory-budget"
    elif isinstance(error, MemoryError):
        message = "out of memory; try a smaller --batch-size (or, to train, --memory-budget)"
    elif isinstance(error, OSError) and error.filename is not None:
        names = [repr(os.fsdecode(name)) for name in (error.filename, error.filename2) if name is not None]
        message = f"{' -> '.join(names)}: {error.strerror or error}"
    elif isinstance(error, ModuleNotFoundError) and error.name and not error.name.startswith("swinkit"):
        message = f"this needs the '{error.name}' package, which is not installed"
    elif isinstance(error, EXPECTED_ERRORS):
        message = str(error) or type(error).__name__
    else:
        return None
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def _escape_undecodable_output() -> None:
    """A file name that is not valid UTF-8 reaches Python with lone surrogates ('\\udcff'); print such
    characters as backslash escapes instead of failing on them."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM ends a command the way Ctrl-C does, through every `finally`: atomic writes remove their
    temporary files and locks are released (training installs its own stop-and-save handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    _escape_undecodable_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    command = f"swinkit {args.command}"
    try:
        with _sigterm_unwinds():
            return args.func(args) or 0
    except KeyboardInterrupt:
        return 130  # Ctrl-C: said by the terminal already
    except Exception as error:
        message = describe_failure(error)
        if message is None or args.verbose:
            traceback.print_exc()
        if message is None:
            print(f"{command}: internal error ({type(error).__name__}): this is a bug in swinkit; please report "
                  "it with the traceback above and the command that caused it", file=sys.stderr)
            return 1
        print(f"{command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
