"""The `structmar` command: thin wiring from flags to library calls.

Each subcommand is one `_add_<name>` function that declares its flags and a handler. Errors a user
can fix (bad flags, missing files, bad data) print as one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a one-line UserError instead of usage text on stderr."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _add_shapes(sub) -> None:
    p = sub.add_parser("shapes", help="write the synthetic Shapes dataset as a COCO-2014-style tree")
    p.add_argument("--out", required=True, help="output directory (created; must be empty unless --overwrite)")
    p.add_argument("--num_train", type=_positive_int, default=2000)
    p.add_argument("--num_val", type=_positive_int, default=256)
    p.add_argument("--image_size", type=int, default=64, help="square image side in pixels (32 to 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")

    def run(args):
        from structmar.shapes import generate_shapes

        generate_shapes(args.out, args.num_train, args.num_val, args.image_size, args.seed, overwrite=args.overwrite)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="structmar", description="StructMAR layout-to-image training system")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_shapes(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except (UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as e:
        print(f"structmar: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("structmar: interrupted", file=sys.stderr)
        return 130
    return 0
