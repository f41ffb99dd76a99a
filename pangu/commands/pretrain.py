"""`pangu pretrain`: train, resuming from the latest checkpoint of train.output_dir."""

from __future__ import annotations

import sys

from pangu.commands.common import add_config_arguments
from pangu.config import load_config


def add_parser(commands) -> None:
    parser = commands.add_parser("pretrain", help="train (resumes from the latest checkpoint of train.output_dir)")
    add_config_arguments(parser)


def run(args) -> int:
    from pangu.pretrain.trainer import TrainingError, pretrain

    try:
        pretrain(load_config(args.config, args.overrides))
    except TrainingError as err:
        print(f"pangu pretrain: stopped: {err}", file=sys.stderr)
        return 3
    return 0
