"""`pangu prepare`: clean, tokenize and shard the corpus of data.sources."""

from __future__ import annotations

import json

from pangu.commands.common import add_config_arguments
from pangu.config import load_config


def add_parser(commands) -> None:
    parser = commands.add_parser("prepare", help="clean, tokenize and shard the corpus of data.sources")
    add_config_arguments(parser)


def run(args) -> int:
    from pangu.data.prepare import prepare

    report = prepare(load_config(args.config, args.overrides))
    print(json.dumps(report, indent=1, ensure_ascii=False))
    return 0
