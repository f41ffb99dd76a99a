"""One module per `pangu` verb. Each has `add_parser(subparsers)` (its options) and `run(args)`
(the work, returning the exit status), and imports heavy modules (torch, DeepSpeed) only in
`run`, so that `pangu --help` and `pangu plan` stay fast."""

from pangu.commands import checkpoint, convert, evaluate, generate, plan, plot, prepare, pretrain

COMMANDS = {
    "prepare": prepare,
    "pretrain": pretrain,
    "evaluate": evaluate,
    "generate": generate,
    "convert": convert,
    "plot": plot,
    "plan": plan,
    "checkpoint": checkpoint,
}
