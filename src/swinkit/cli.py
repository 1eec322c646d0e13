"""The `swinkit` command. Each subcommand parses arguments and calls one importable function;
no logic lives here that the Python API lacks."""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from . import api
from .models.registry import STANDARD_MODELS, UnknownModelError, get_config, list_models
from .models.swin import SwinTransformer
from .weights import layouts
from .weights.io import CheckpointError


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except (CheckpointError, UnknownModelError, FileNotFoundError, ValueError) as error:
        print(f"swinkit {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
