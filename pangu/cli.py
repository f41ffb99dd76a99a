"""The `pangu` command: prepare | pretrain | evaluate | generate | convert | plot | plan."""

from __future__ import annotations

import argparse
import json
import sys

from pangu.config import ConfigError, load_config


def _config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set train.steps=100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pangu", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="clean, tokenize and shard the corpus of data.sources")
    _config_args(p)

    p = commands.add_parser("pretrain", help="train (resumes from the latest checkpoint of train.output_dir)")
    _config_args(p)

    p = commands.add_parser("evaluate", help="validation loss and perplexity of a checkpoint")
    _config_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint, checkpoints or run directory")
    p.add_argument("--baseline", action="store_true",
                   help="also report the perplexity of a unigram model of the training shards")
    p.add_argument("--max-samples", type=int, default=256)
    from pangu.evaluation.harness import add_arguments as add_task_arguments

    add_task_arguments(p)  # --task TASK...: zero/few-shot tasks (pangu/evaluation)

    p = commands.add_parser("generate", help="continue a prompt")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)

    p = commands.add_parser("convert", help="PanGu-α weights in and out (MindSpore release, Hugging Face)")
    formats = p.add_subparsers(dest="format", required=True)
    imp = formats.add_parser("import-mindspore", help="MindSpore .ckpt / .npz / sliced release -> pangu weights")
    imp.add_argument("src", help="a .ckpt or .npz with the original names, or a directory of release slices")
    imp.add_argument("out")
    imp.add_argument("--num-heads", type=int, required=True)
    imp.add_argument("--activation", choices=["fast_gelu", "gelu"], default="fast_gelu")
    imp.add_argument("--final-ln", choices=["before", "after"], default="before")
    imp.add_argument("--tokenizer", default=None, help="a SentencePiece model to ship with the weights")
    from pangu.convert.huggingface import add_export_hf_arguments, add_import_hf_arguments
    from pangu.convert.importer import add_import_arguments

    add_import_arguments(imp)
    add_export_hf_arguments(formats.add_parser("export-hf", help="pangu checkpoint -> Hugging Face GPTPangu"))
    add_import_hf_arguments(formats.add_parser("import-hf", help="Hugging Face GPTPangu -> pangu weights"))

    p = commands.add_parser("plot", help="loss and learning-rate curves of a run to RUN_DIR/curves.png")
    p.add_argument("run_dir")

    p = commands.add_parser("plan", help="rank the (dp, tp, pp, recompute, micro-batch) layouts that fit N devices")
    _config_args(p)
    from pangu.parallel.planner import add_arguments as add_plan_arguments

    add_plan_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pangu.data import DataError
    from pangu.pretrain.tensor_store import CheckpointError

    try:
        return _run(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as err:
        print(f"pangu {args.command}: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        from pangu.data.prepare import prepare

        report = prepare(load_config(args.config, args.overrides))
        print(json.dumps(report, indent=1, ensure_ascii=False))
    elif args.command == "pretrain":
        from pangu.pretrain.trainer import TrainingError, pretrain

        try:
            pretrain(load_config(args.config, args.overrides))
        except TrainingError as err:
            print(f"pangu pretrain: stopped: {err}", file=sys.stderr)
            return 3
    elif args.command == "evaluate":
        if args.task:
            from pangu.evaluation.harness import main as evaluate_tasks

            return evaluate_tasks(args)
        _evaluate(args)
    elif args.command == "generate":
        _generate(args)
    elif args.command == "convert":
        _convert(args)
    elif args.command == "plot":
        from pangu.pretrain.plot import plot_run

        print(plot_run(args.run_dir))
    elif args.command == "plan":
        from pangu.parallel.planner import main as plan

        return plan(args)
    return 0


def _evaluate(args) -> None:
    import pangu
    from pangu.pretrain.evaluate import unigram_perplexity, validation_perplexity

    config = load_config(args.config, args.overrides)
    model, _ = pangu.load(args.checkpoint)
    result = validation_perplexity(model, config, max_samples=args.max_samples)
    if args.baseline:
        result["unigram_ppl"] = unigram_perplexity(config, model.config.seq_length)
        result["ppl_ratio_to_unigram"] = result["val_ppl"] / result["unigram_ppl"]
    print(json.dumps(result, indent=1))


def _generate(args) -> None:
    import pangu
    from pangu.pretrain.generate import generate_ids

    model, tokenizer = pangu.load(args.checkpoint)
    if tokenizer is None:
        raise ConfigError(f"{args.checkpoint} carries no tokenizer (an imported weight file?): "
                          f"import it with --tokenizer")
    ids = generate_ids(model, tokenizer.encode(args.prompt), max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       stop_ids=(tokenizer.eod_id,), seed=args.seed)
    print(args.prompt + tokenizer.decode(ids))


def _convert(args) -> None:
    from pangu.convert import huggingface
    from pangu.convert.importer import import_kwargs, import_mindspore

    # the readers raise ValueError naming the file and what is wrong with it
    try:
        if args.format == "import-mindspore":
            out = import_mindspore(args.src, args.out, num_heads=args.num_heads, activation=args.activation,
                                   final_layernorm=args.final_ln, tokenizer=args.tokenizer, **import_kwargs(args))
        elif args.format == "export-hf":
            out = huggingface.export_hf_from_args(args)
        else:
            out = huggingface.import_hf_from_args(args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(out)


if __name__ == "__main__":
    sys.exit(main())
