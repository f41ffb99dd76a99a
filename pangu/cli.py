"""The `pangu` command: prepare | pretrain | evaluate | generate | convert | plot | plan | checkpoint.
Each verb lives in pangu/commands/; this module builds the parser and turns the errors a user can
cause into one line on stderr (exit status 2)."""

from __future__ import annotations

import argparse
import sys

from pangu.commands import COMMANDS
from pangu.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pangu", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pangu.checkpoint.store import CheckpointError
    from pangu.data import DataError

    try:
        return COMMANDS[args.command].run(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as err:
        print(f"pangu {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
