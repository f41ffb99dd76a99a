"""Options and checks that several commands share."""

from __future__ import annotations

import argparse

from pangu.config import ConfigError, parse_bytes


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override config values (repeatable), e.g. --set train.steps=100 optim.lr=2e-3",
    )


def byte_size(text: str) -> int:
    """argparse type: a size as users type it (80GiB, 32GB, 1.5TiB, 8e10)."""
    try:
        return parse_bytes(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
