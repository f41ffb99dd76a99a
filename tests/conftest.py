import pytest


@pytest.fixture(scope="session")
def single_process():
    """A world of one (gloo) with megatron-core's parallel state, for building models in-process."""
    import torch.distributed as dist

    from pangu.config import ParallelConfig
    from pangu.parallel.topology import init_distributed

    if not dist.is_initialized():
        init_distributed(ParallelConfig())
        import torch

        torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A prepared corpus small enough for tests: 1500 People's Daily paragraphs, a 600-piece BPE."""
    from tests.helpers import prepare_tiny_corpus

    return prepare_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def straight_run(tiny_corpus, tmp_path_factory):
    """A tiny model trained for tests.test_training.STEPS steps without interruption: the
    reference that stopped, crashed, preempted or rolled-back runs are compared with."""
    from tests.helpers import run_pretrain, tiny_overrides

    out = tmp_path_factory.mktemp("straight")
    result = run_pretrain(tiny_overrides(tiny_corpus, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def layout_runs(tiny_corpus, tmp_path_factory) -> dict:
    """Every run the layout tests compare (tests/parallel/layout_matrix.py), made once per session:
    {case name: what the run recorded}. Other areas read it too (bytes per rank at (2, 2, 2))."""
    from tests.parallel.layout_matrix import run_all

    return run_all(tiny_corpus, tmp_path_factory.mktemp("layouts"))
