"""bench/pipeline_bubble.py: its replay of recorded pipeline actions, and a small measurement that
must land near the schedules' theoretical bubble."""

from __future__ import annotations

import pytest

from bench.pipeline_bubble import Sleeps, measure, replay, theoretical_bubble


def one_f_one_b(rank: int, pp: int, microbatches: int, forward: float, backward: float) -> list[list]:
    """The actions torch's Schedule1F1B runs on `rank`, in order: pp - rank forwards, then a
    backward and a forward alternately, then the remaining backwards."""
    warmup = min(microbatches, pp - rank)
    actions = [[rank, "F", mb, forward] for mb in range(warmup)]
    for mb in range(microbatches):
        actions.append([rank, "B", mb, backward])
        if warmup + mb < microbatches:
            actions.append([rank, "F", warmup + mb, forward])
    return actions


@pytest.mark.parametrize("pp,microbatches", [(2, 4), (4, 4), (4, 8)])
def test_replay_of_1f1b_gives_its_bubble(pp, microbatches):
    orders = [one_f_one_b(rank, pp, microbatches, forward=1.0, backward=3.0) for rank in range(pp)]
    replayed, seconds = replay(orders, pp)
    assert seconds == pytest.approx((microbatches + pp - 1) * (1.0 + 3.0))
    assert replayed == pytest.approx((pp - 1) / (microbatches + pp - 1))
    assert replayed == pytest.approx(theoretical_bubble("1f1b", pp, microbatches, Sleeps(1.0, 3.0, 1.0)))


def test_replay_waits_for_the_slowest_dependency():
    # rank 1's forward of stage 1 cannot start before rank 0's forward of stage 0 ends (at 5), and
    # rank 0's backward waits for rank 1's (ends at 5 + 1 + 2 = 8): the step is 8 + 3 = 11 long
    orders = [[[0, "F", 0, 5.0], [0, "B", 0, 3.0]], [[1, "F", 0, 1.0], [1, "B", 0, 2.0]]]
    assert replay(orders, 2) == pytest.approx((1 - (8 + 3) / 2 / 11, 11))


def test_replay_refuses_an_order_that_cannot_run():
    # rank 0 waits for stage 1's backward before running the forward stage 1 needs
    orders = [[[0, "B", 0, 1.0], [0, "F", 0, 1.0]], [[1, "F", 0, 1.0], [1, "B", 0, 1.0]]]
    with pytest.raises(RuntimeError, match="cannot run in order"):
        replay(orders, 2)


def test_zbv_theory_only_where_its_order_is_built_for():
    sleeps = Sleeps(forward=0.02, backward=0.04, weight=0.02)  # per chunk: f = i = w = 10 ms
    assert theoretical_bubble("zbv", 4, 4, sleeps) is None  # m < 2p - 1
    assert theoretical_bubble("zbv", 4, 8, sleeps) == pytest.approx(0.03 / (8 * 0.06 + 0.03))
    assert theoretical_bubble("zbv", 2, 4, Sleeps(0.02, 0.04, 0.01)) is None  # i != w


@pytest.mark.slow
@pytest.mark.distributed
def test_measured_idle_is_near_theory_and_interleaving_idles_less():
    sleeps = Sleeps(forward=0.06, backward=0.12, weight=0.06)  # long beside a p2p hop (~2 ms on busy cores)
    rows = {row.schedule: row for row in measure(2, [("1f1b", 4), ("interleaved_1f1b", 4)], sleeps, repeats=2)}
    for row in rows.values():
        # the actions torch ran, replayed without communication, give the paper's bubble exactly
        assert row.simulated == pytest.approx(row.theory, abs=1e-9)
        # measured: the sleeps plus communication and the schedules' own work on 2 busy cores
        assert row.measured == pytest.approx(row.theory, abs=0.06), row
    assert rows["interleaved_1f1b"].measured < rows["1f1b"].measured
