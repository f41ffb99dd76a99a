"""`pangu plot RUN_DIR`: loss and learning-rate curves of a run to RUN_DIR/curves.png."""

from __future__ import annotations


def add_parser(commands) -> None:
    parser = commands.add_parser("plot", help="loss and learning-rate curves of a run to RUN_DIR/curves.png")
    parser.add_argument("run_dir")


def run(args) -> int:
    from pangu.pretrain.plot import plot_run

    print(plot_run(args.run_dir))
    return 0
