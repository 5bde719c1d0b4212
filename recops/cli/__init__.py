"""The `recops` command line.

Each module in this package defines ``register(subparsers)``, adding one command whose handler is
set with ``parser.set_defaults(func=handler)``. Handlers take the parsed namespace and return a
dict (printed as the last stdout line with ``--json``) or None. Heavy imports stay inside handlers
so ``recops --help`` is fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import pkgutil
import sys

from recops import __version__
from recops.cli.common import emit
from recops.errors import RecopsError

FULL_DISK = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # a full disk, a file-size limit, a quota


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recops", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"recops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "common":
            continue
        importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except RecopsError as exc:
        print(f"recops {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"recops {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in FULL_DISK:
            raise
        print(
            f"recops {args.command}: error: no room to write {exc.filename or 'a file'} ({exc.strerror}); free disk "
            "space (or raise the file-size limit) and rerun: nothing half-written was kept",
            file=sys.stderr,
        )
        return 2
    if result is not None:
        emit(result, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
