"""`pangu convert`: PanGu-α weights in and out (MindSpore release, Hugging Face)."""

from __future__ import annotations

from pangu.commands.common import byte_size, positive_int
from pangu.convert.huggingface import DEFAULT_SHARD_BYTES
from pangu.convert.importer import DTYPES
from pangu.schema import ConfigError


def add_parser(commands) -> None:
    parser = commands.add_parser("convert", help="PanGu-α weights in and out (MindSpore release, Hugging Face)")
    formats = parser.add_subparsers(dest="format", required=True)

    imp = formats.add_parser("import-mindspore", help="MindSpore .ckpt / .npz / sliced release -> pangu weights")
    imp.add_argument("src", help="a .ckpt or .npz with the original names, or a directory of release slices")
    imp.add_argument("out")
    imp.add_argument("--num-heads", type=positive_int, required=True)
    imp.add_argument("--activation", choices=["fast_gelu", "gelu"], default="fast_gelu")
    imp.add_argument("--final-ln", choices=["before", "after"], default="before")
    imp.add_argument("--tokenizer", default=None, help="a SentencePiece model to ship with the weights")
    imp.add_argument(
        "--strategy",
        default=None,
        help="the parallel-strategy file of a sliced release (SRC a directory of slices); "
        "default: the one *strategy*.ckpt inside SRC",
    )
    imp.add_argument(
        "--dtype", choices=DTYPES, default=None, help="cast every tensor (default: keep the stored dtypes)"
    )
    imp.add_argument(
        "--vocab-size",
        type=positive_int,
        default=None,
        help="the real vocabulary when the word embedding is padded (default: the tokenizer's "
        "size, or 40000 for a zero-padded 40064-row embedding)",
    )

    export = formats.add_parser(
        "export-hf",
        help="pangu checkpoint -> Hugging Face directory (GPTPangu layout, with its code: trust_remote_code)",
    )
    export.add_argument("checkpoint", help="a pangu checkpoint, checkpoints directory or run directory")
    export.add_argument("out", help="the Hugging Face model directory to create")
    export.add_argument(
        "--shard-size", type=byte_size, default=DEFAULT_SHARD_BYTES, help="largest safetensors file (default 5GiB)"
    )
    export.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="default: the stored dtype (float32 for training checkpoints; the majority dtype if they differ)",
    )
    export.add_argument(
        "--pad-vocab",
        action="store_true",
        help="keep pangu's vocabulary padding (e.g. 40064 rows) instead of the port's 40000",
    )
    export.add_argument(
        "--no-lm-head", action="store_true", help="do not write lm_head.weight (a copy of the tied word embedding)"
    )
    export.add_argument(
        "--tokenizer", default=None, help="a SentencePiece model to ship (default: the checkpoint's own tokenizer)"
    )

    back = formats.add_parser("import-hf", help="Hugging Face GPTPangu -> pangu weights")
    back.add_argument("src", help="a GPTPangu Hugging Face directory (config.json + safetensors)")
    back.add_argument("out")
    back.add_argument("--dtype", choices=DTYPES, default=None)
    back.add_argument("--vocab-size", type=positive_int, default=None)
    back.add_argument("--tokenizer", default=None)


def run(args) -> int:
    from pangu.convert.huggingface import export_hf, import_hf
    from pangu.convert.importer import import_mindspore

    # the readers raise ValueError naming the file and what is wrong with it
    try:
        if args.format == "import-mindspore":
            out = import_mindspore(
                args.src,
                args.out,
                num_heads=args.num_heads,
                activation=args.activation,
                final_layernorm=args.final_ln,
                tokenizer=args.tokenizer,
                strategy=args.strategy,
                dtype=args.dtype,
                vocab_size=args.vocab_size,
            )
        elif args.format == "export-hf":
            out = export_hf(
                args.checkpoint,
                args.out,
                shard_bytes=args.shard_size,
                dtype=args.dtype,
                pad_vocab=args.pad_vocab,
                tie_lm_head=not args.no_lm_head,
                tokenizer=args.tokenizer,
            )
        else:
            out = import_hf(args.src, args.out, dtype=args.dtype, vocab_size=args.vocab_size, tokenizer=args.tokenizer)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(out)
    return 0
