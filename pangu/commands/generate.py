"""`pangu generate`: continue a prompt with a checkpoint's model."""

from __future__ import annotations

from pangu.commands.common import non_negative_int, number, positive_int
from pangu.schema import ConfigError


def add_parser(commands) -> None:
    parser = commands.add_parser("generate", help="continue a prompt")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=positive_int, default=48)
    parser.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="0 = all tokens")
    parser.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0, help="1 = all tokens")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import pangu
    from pangu.checkpoint.belonging import TrainedWith, UsedWith
    from pangu.data.tokenizer import TOKENIZER_FILE, PanguTokenizer
    from pangu.evaluation.inference import generate_ids

    trained = TrainedWith.read(args.checkpoint)
    carried = trained.checkpoint / TOKENIZER_FILE
    if not carried.is_file():
        raise ConfigError(
            f"{args.checkpoint} carries no tokenizer (an imported weight file?): import it with --tokenizer"
        )
    tokenizer = PanguTokenizer.from_file(carried)
    trained.check_tokenizer(UsedWith.of_tokenizer(tokenizer, f"the tokenizer {trained.checkpoint} carries"))
    model, _ = pangu.load(trained.checkpoint)
    ids = generate_ids(
        model,
        tokenizer.encode(args.prompt),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_ids=(tokenizer.eod_id,),
        seed=args.seed,
    )
    print(args.prompt + tokenizer.decode(ids))
    return 0
