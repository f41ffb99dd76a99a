"""`pangu evaluate`: validation perplexity of a checkpoint, or zero/few-shot tasks (--task)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pangu.commands.common import add_config_arguments, non_negative_int, positive_int
from pangu.config import load_config


def add_parser(commands) -> None:
    parser = commands.add_parser("evaluate", help="validation loss and perplexity of a checkpoint, or tasks")
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="checkpoint, checkpoints or run directory")
    parser.add_argument(
        "--baseline", action="store_true", help="also report the perplexity of a unigram model of the training shards"
    )
    parser.add_argument("--max-samples", type=positive_int, default=256)
    parser.add_argument(
        "--task",
        nargs="+",
        default=None,
        metavar="TASK",
        help="task files, builtin task names (pangu/tasks/*.yaml, e.g. sentiment) or NAME=DATA_FILE; "
        "evaluates them instead of the validation perplexity",
    )
    parser.add_argument(
        "--shots", type=non_negative_int, default=None, help="number of demonstrations (overrides the task files)"
    )
    parser.add_argument(
        "--max-examples",
        type=positive_int,
        default=None,
        help="evaluate a seeded random subset of this many examples per task",
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of shot sampling, subsets and bootstrap")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="rows per forward pass (with the engine: the micro-batch size)",
    )
    parser.add_argument(
        "--engine",
        action="store_true",
        help="score through the pipeline engine of the config's parallel layout even in one "
        "process (automatic under torchrun)",
    )
    parser.add_argument("--output", default=None, help="write the results as JSON to this file")
    parser.add_argument("--predictions", default=None, help="write per-example records as JSON lines to this file")


def run(args) -> int:
    if args.task:
        return _tasks(args)
    import pangu
    from pangu.checkpoint.belonging import TrainedWith, UsedWith
    from pangu.evaluation.perplexity import unigram_perplexity, validation_perplexity

    config = load_config(args.config, args.overrides)
    trained = TrainedWith.read(args.checkpoint)
    trained.check_config(config.model)
    trained.check_tokenizer(UsedWith.prepared(config.data.prepared_dir))
    model, _ = pangu.load(trained.checkpoint)
    result = validation_perplexity(model, config, max_samples=args.max_samples)
    if args.baseline:
        result["unigram_ppl"] = unigram_perplexity(config, model.config.seq_length)
        result["ppl_ratio_to_unigram"] = result["val_ppl"] / result["unigram_ppl"]
    print(json.dumps(result, indent=1))
    return 0


def _tasks(args) -> int:
    """The tasks of --task, in one process or on every rank through the engine; rank 0 prints
    the results as JSON."""
    from pangu.checkpoint.belonging import TrainedWith
    from pangu.evaluation.harness import build_eval_engine, evaluate_tasks, tokenizer_for
    from pangu.evaluation.tasks import load_task
    from pangu.parallel import peers
    from pangu.parallel.stop import StopRequest

    config = load_config(args.config, args.overrides)
    use_engine = args.engine or int(os.environ.get("WORLD_SIZE", "1")) > 1
    tasks = [load_task(spec, prepared_dir=config.data.prepared_dir) for spec in args.task]
    trained = TrainedWith.read(args.checkpoint)
    trained.check_config(config.model)
    tokenizer = tokenizer_for(trained, config)
    if use_engine:
        StopRequest()  # signals are noted, and every rank stops scoring at the same call (EngineScorer)
        engine, config, topology = build_eval_engine(config, trained.checkpoint, args.batch_size)
        target, rank, layout = engine, topology.rank, topology.layout
    else:
        import pangu

        target, _ = pangu.load(trained.checkpoint)
        topology, rank, layout = None, 0, "(dp, tp, pp) = (1, 1, 1)"
    log = logging.getLogger("pangu.evaluate").info if rank == 0 else None
    results = evaluate_tasks(
        target,
        tasks,
        tokenizer,
        config=config,
        topology=topology,
        batch_size=args.batch_size,
        seed=args.seed,
        shots=args.shots,
        max_examples=args.max_examples,
        details=True,
        log=log,
    )
    if rank == 0:
        if args.predictions:
            with open(args.predictions, "w", encoding="utf-8") as f:
                for name, result in results.items():
                    for record in result.get("details", []):
                        f.write(json.dumps({"task": name, **record}, ensure_ascii=False) + "\n")
        report = {
            "checkpoint": str(args.checkpoint),
            "layout": layout,
            "seed": args.seed,
            "tasks": {name: {k: v for k, v in r.items() if k != "details"} for name, r in results.items()},
        }
        text = json.dumps(report, indent=1, ensure_ascii=False)
        if args.output:
            Path(args.output).write_text(text + "\n", encoding="utf-8")
        print(text)
    if use_engine:
        import torch.distributed as dist

        with peers.watched("the end of the evaluation", topology.host_group):
            dist.barrier(group=topology.host_group)
    return 0
