import pytest


@pytest.fixture(scope="session")
def single_process():
    """A world of one (gloo) with megatron-core's parallel state, for building models in-process."""
    import torch.distributed as dist

    from pangu.config import ParallelConfig
    from pangu.parallel.tensor_parallel import seed_rng_streams
    from pangu.parallel.topology import init_distributed

    if not dist.is_initialized():
        init_distributed(ParallelConfig())
        seed_rng_streams(0)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A prepared corpus small enough for tests: 1500 People's Daily paragraphs, a 600-piece BPE."""
    import json

    from pangu.config import load_config
    from pangu.data.prepare import prepare
    from pangu.data.sources import people_daily_file

    root = tmp_path_factory.mktemp("corpus")
    lines = people_daily_file().read_text(encoding="utf-8").splitlines()[:1500]
    texts = ["".join(token.rsplit("/", 1)[0] for token in line.split()) for line in lines if line.strip()]
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    overrides = [
        f"data.sources=[{{kind: jsonl, path: {root / 'docs.jsonl'}}}]",
        "data.tokenizer.kind=train",
        "data.tokenizer.vocab_size=600",
        f"data.prepared_dir={root / 'prepared'}",
        "data.valid_fraction=0.05",
    ]
    prepare(load_config(None, overrides), progress=False)
    return root / "prepared"


@pytest.fixture(scope="session")
def straight_run(tiny_corpus, tmp_path_factory):
    """A tiny model trained for tests.test_training.STEPS steps without interruption: the
    reference that stopped, crashed, preempted or rolled-back runs are compared with."""
    from tests.helpers import run_pretrain, tiny_overrides

    out = tmp_path_factory.mktemp("straight")
    result = run_pretrain(tiny_overrides(tiny_corpus, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out
