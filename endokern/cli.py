"""The ``endokern`` command line: a thin shell over the library."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from . import __version__
from .ops.registry import available_backends


def cmd_backends(args: argparse.Namespace) -> int:
    """Print which kernel backends run on a device, and why the others do not."""
    for name, reason in available_backends(args.device).items():
        print(f"{name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="endokern", description=__doc__)
    parser.add_argument("--version", action="version", version=f"endokern {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    backends = sub.add_parser("backends", help=cmd_backends.__doc__)
    backends.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    backends.set_defaults(func=cmd_backends)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
