"""The `frugalm` command: one small module per subcommand, each parsing, calling the API, printing.

A FrugalmError is printed as one line on stderr with exit status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from frugalm import __version__
from frugalm.errors import FrugalmError

SUBCOMMANDS = {
    "bench": "frugalm.cli.bench",
    "run": "frugalm.cli.run",
    "optimize": "frugalm.cli.optimize",
    "report": "frugalm.cli.report",
    "export": "frugalm.cli.export",
    "eval": "frugalm.cli.eval",
    "validate": "frugalm.cli.validate",
    "ls": "frugalm.cli.ls",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="frugalm", description="Make causal LMs cheaper to train, adapt and run, and prove by how much."
    )
    parser.add_argument("--version", action="version", version=f"frugalm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # frugalm shows its own progress; the libraries' loading bars and advice (e.g. "sequence
    # longer than the maximum": frugalm windows its text itself) would only bury it. Set
    # before transformers is imported, which reads both once.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except FrugalmError as exc:
        print(f"frugalm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"frugalm {args.command}: interrupted; nothing partial was stored", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
