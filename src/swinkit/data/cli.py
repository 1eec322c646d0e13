"""`swinkit data ...`: dataset preparation commands (thin wrappers over `swinkit.data`)."""
from __future__ import annotations

import json

from ..cli_types import non_negative_int
from .fashion_mnist import DEFAULT_SOURCE, import_fashion_mnist


def _cmd_fashion_mnist(args) -> int:
    result = import_fashion_mnist(args.out, args.source, workers=args.workers)
    print(json.dumps(result) if args.json else result["message"])
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare datasets (image-folder layout)")
    kinds = data.add_subparsers(dest="dataset", required=True)
    fashion = kinds.add_parser("fashion-mnist", help="Debian's Fashion-MNIST IDX files -> PNG folders DIR/train, DIR/val")
    fashion.add_argument("--out", required=True, help="output folder (created; refused if it holds something else)")
    fashion.add_argument("--source", default=DEFAULT_SOURCE, help=f"folder with the IDX files (default {DEFAULT_SOURCE})")
    fashion.add_argument("--workers", type=non_negative_int, default=2, help="PNG writer processes (0 or 1: none)")
    fashion.add_argument("--json", action="store_true", help="print the result as one JSON object")
    fashion.set_defaults(func=_cmd_fashion_mnist)
