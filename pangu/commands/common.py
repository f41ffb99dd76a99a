"""Options and checks that several commands share."""

from __future__ import annotations

import argparse
import math

from pangu.schema import ConfigError, parse_bytes


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


def number(kind: type, low: float | None = None, high: float | None = None, *, low_open=False, high_open=False):
    """argparse type: an int or a finite float within [low, high] (open ends where asked), the
    domain named in the error argparse prints."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    domain = f"in {lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (
            value is None
            or not math.isfinite(value)
            or (low is not None and (value < low or (low_open and value == low)))
            or (high is not None and (value > high or (high_open and value == high)))
        ):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not allowed: expected {'an integer' if kind is int else 'a number'} {domain}"
            )
        return value

    return parse


positive_int = number(int, 1)
non_negative_int = number(int, 0)
positive_float = number(float, 0, low_open=True)
