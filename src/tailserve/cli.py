"""`tailserve fetch | serve | generate | chat | bench`."""

from __future__ import annotations

import argparse
import sys

from tailserve.config import DEFAULT_MODEL


def _fetch(args: argparse.Namespace) -> int:
    from tailserve.models.loader import resolve_model

    print(resolve_model(args.model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="download the default model into the cache (offline once cached)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.set_defaults(func=_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
