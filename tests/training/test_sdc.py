"""train.sdc_check (docs/sdc.md): a flipped bit in one rank's optimizer state and a perturbed
weight on one rank are found and named, and the configured action is taken, on both engines;
and the pieces that name them (checksums, the majority vote, elements of fragments)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from pangu.config import SdcCheckConfig
from pangu.optim.s3 import BoundRecord
from pangu.parallel.engine import Fragment
from pangu.parallel.sdc import Findings, SdcCheck, checksum, element_of, odd_ones_out
from tests.helpers import PROBES, losses, stored_tensors, tiny_overrides, torchrun

PROBE = PROBES / "sdc_probe.py"


# ---------------------------------------------------------------------------------------------
# the pieces
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_single_flipped_bit_changes_the_checksum(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(1000, generator=generator).to(dtype)
    reference = checksum(weights)
    assert checksum(weights.clone()) == reference  # the same bytes, the same number
    bits = torch.iinfo(torch.int32 if dtype == torch.float32 else torch.int16).bits
    integers = weights.view(torch.int32 if dtype == torch.float32 else torch.int16)
    for index in torch.randint(0, 1000, (20,), generator=generator).tolist():
        for bit in range(bits):
            flipped = integers.clone()
            flipped[index] ^= 1 << bit if bit < bits - 1 else -(1 << bit)
            assert checksum(flipped.view(dtype)) != reference, (index, bit)


@pytest.mark.parametrize(
    "values, odd, majority",
    [
        ([5, 5, 5], [], True),
        ([5, 5, 7], [2], True),
        ([1, 1, 2, 2, 1], [2, 3], True),
        ([5, 7], [0, 1], False),  # two replicas: no way to tell which one is right
        ([1, 2, 3], [0, 1, 2], False),
        ([1, 1, 2, 2], [0, 1, 2, 3], False),
    ],
)
def test_the_majority_vote_names_the_odd_ones(values: list[int], odd: list[int], majority: bool) -> None:
    assert odd_ones_out(values) == (odd, majority)


def test_an_element_of_a_fragment_is_named_in_the_full_tensor() -> None:
    # tp rank 1 of 2 of a [64, 64] weight split on its columns: box rows 0..64, columns 32..64;
    # this rank's fragment holds the box's row-major elements 100..200, from element 7 of its buffer
    fragment = Fragment("blocks.0.attention.dense.weight", ((0, 64), (32, 64)), (100, 200), buffer=0, start=7)
    assert element_of(fragment, 0) == [3, 36]  # box element 100: row 3, column 4 of the box
    assert element_of(fragment, 5) == [3, 41]


def test_findings_say_what_where_and_on_which_rank() -> None:
    violation = {"parameter": "p.weight", "element": [3, 4], "rank": 5, "host": "n7", "ratio": 2e30, "coordinates": 1}
    disagreement = {"parameter": "ln.bias", "ranks": [2], "hosts": ["n3"], "replicas": [0, 2, 4], "majority": True}
    said = Findings(1.0, [violation], [disagreement]).describe()
    assert "p.weight at element [3, 4] on rank 5 (n7) was above its bound of lr (1 coordinate(s)" in said
    assert "the largest: 2e+30 x lr" in said
    assert "ln.bias differs on rank 2 (n3) from the other replicas (ranks 0, 2, 4)" in said
    assert not Findings(0.7) and Findings(0.7, [violation])


@pytest.mark.parametrize(
    "held, parameter, element",
    [
        ([5, 6], "a.weight", [1, 1]),
        ([10], "b.bias", [4]),
        ([17], "(padding of buffer 0)", []),
        ([], "one of the 2 parameters of buffer 0", []),  # no mark: a kernel that lost -0.0's sign
    ],
)
def test_a_held_coordinate_is_named_in_the_parameter_it_belongs_to(single_process, held, parameter, element):
    """A flat ZeRO-1 partition as the DeepSpeed engine describes it: a [2, 4] weight's elements
    0..8, then elements 2..8 of an [8] bias, then alignment padding."""
    flat, s = torch.zeros(20), torch.ones(20)
    s[held] = -0.0
    fragments = [Fragment("a.weight", ((0, 2), (0, 4)), (0, 8), 0, 0), Fragment("b.bias", ((0, 8),), (2, 8), 0, 8)]
    engine = SimpleNamespace(
        optimizer=SimpleNamespace(),
        fragments=lambda: fragments,
        checkpoint_buffers=lambda weights_only: [{"weight": flat}],
    )
    topology = SimpleNamespace(rank=0, world_size=1, host_group=dist.group.WORLD)
    check = SdcCheck(SdcCheckConfig(), engine, topology, bounded=True)
    check.bound.add(BoundRecord(flat, torch.tensor(float("nan")), s))
    found = check.after_step(fingerprint=False)
    assert found.update_ratio == float("inf")  # nan counts as the largest
    (violation,) = found.violations
    assert (violation["parameter"], violation["element"], violation["coordinates"]) == (parameter, element, len(held))


def test_a_step_within_the_bound_finds_nothing(single_process):
    engine = SimpleNamespace(optimizer=SimpleNamespace())
    topology = SimpleNamespace(rank=0, world_size=1, host_group=dist.group.WORLD)
    check = SdcCheck(SdcCheckConfig(), engine, topology, bounded=True)
    assert check.after_step(fingerprint=False).update_ratio is None  # nothing stepped (a skipped step)
    for largest in (0.3, 0.7):
        check.bound.add(BoundRecord(torch.zeros(3), torch.tensor(largest), torch.ones(3)))
    found = check.after_step(fingerprint=False)
    assert found.update_ratio == pytest.approx(0.7) and not found


# ---------------------------------------------------------------------------------------------
# runs with faults injected (tests/probes/sdc_probe.py)
# ---------------------------------------------------------------------------------------------


def faulty_run(tmp_path: Path, faults: list[dict], settings: list[str], nproc: int):
    """`pangu pretrain` with `faults` injected; (the finished process, its sdc events by step,
    what was injected)."""
    faults_file = tmp_path / "faults.json"
    faults_file.write_text(json.dumps(faults))
    done = torchrun(PROBE, [str(faults_file), *settings], nproc)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    injected = [json.loads(line) for line in (tmp_path / "injected.jsonl").read_text().splitlines()]
    return done, records, injected


def sdc_events(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if r.get("event") == "sdc"}


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_dp3_names_a_corrupted_state_and_the_rank_whose_weights_differ(tiny_corpus, tmp_path) -> None:
    """Three data-parallel replicas (DeepSpeed, ZeRO-1): a flipped bit in rank 2's share of m is
    held and named at the step it would have broken the bound, and the run goes on; a flipped last
    bit of a weight on rank 1 is named by the majority of the replicas, and stops the run
    (action skip: replicas that disagree cannot be skipped)."""
    faults = [{"kind": "state", "step": 2, "rank": 2, "key": "m"}, {"kind": "weight", "step": 4, "rank": 1}]
    settings = tiny_overrides(
        tiny_corpus,
        tmp_path / "run",
        "train.micro_batch_size=1",
        "parallel.engine=deepspeed",
        "train.global_batch_size=6",
        "train.sdc_check.fingerprint_interval=2",
    )
    done, records, (state, weight) = faulty_run(tmp_path, faults, settings, nproc=3)
    assert done.returncode != 0 and "pangu pretrain: stopped: silent data corruption at step 4" in done.stderr
    assert "differs on rank 1 (" in done.stderr and "from the other replicas (ranks 0, 1, 2)" in done.stderr
    events = sdc_events(records)
    assert sorted(events) == [2, 4]
    (violation,) = events[2]["violations"]
    assert events[2]["action"] == "held" and events[2]["disagreements"] == []
    assert (violation["parameter"], violation["element"], violation["rank"]) == (
        state["parameter"],
        state["element"],
        2,
    )
    assert violation["coordinates"] == 1 and violation["ratio"] > 1e30
    (disagreement,) = events[4]["disagreements"]
    assert events[4]["action"] == "stop"
    assert disagreement["parameter"] == weight["parameter"]
    assert (disagreement["ranks"], disagreement["replicas"], disagreement["majority"]) == ([1], [0, 1, 2], True)
    # the held step and the next ones trained on: every rank logged each step once, with a finite loss
    steps = {r["step"]: r for r in records if "loss" in r}
    assert sorted(steps) == [1, 2, 3, 4] and all(r["loss"] == r["loss"] for r in steps.values())
    assert all(0 < r["update_ratio"] <= 1 for step, r in steps.items() if step != 2)
    assert steps[2]["update_ratio"] > 1e30


@pytest.mark.slow
@pytest.mark.distributed
def test_torch_engine_tp2_names_a_corrupted_state_and_both_replicas_that_differ(tiny_corpus, tmp_path) -> None:
    """The torch engine at tp = 2: S3 steps each parameter's local shard, so the held element is
    named in the full tensor through the shard's box; the parameters tp does not split are held by
    both ranks, and with two replicas there is no majority: both are named."""
    faults = [{"kind": "state", "step": 2, "rank": 1, "key": "m"}, {"kind": "weight", "step": 4, "rank": 1}]
    settings = tiny_overrides(
        tiny_corpus,
        tmp_path / "run",
        "parallel.engine=torch",
        "parallel.tp=2",
        "train.sdc_check.fingerprint_interval=4",
    )
    done, records, (state, weight) = faulty_run(tmp_path, faults, settings, nproc=2)
    assert done.returncode != 0 and "silent data corruption at step 4" in done.stderr
    events = sdc_events(records)
    assert sorted(events) == [2, 4]
    (violation,) = events[2]["violations"]
    assert (violation["parameter"], violation["element"], violation["rank"]) == (
        state["parameter"],
        state["element"],
        1,
    )
    assert state["parameter"] == "embedding.word_embeddings.weight" and state["element"][0] >= 320  # tp rank 1's rows
    (disagreement,) = events[4]["disagreements"]
    assert disagreement["parameter"] == weight["parameter"]
    assert (disagreement["ranks"], disagreement["majority"]) == ([0, 1], False)


@pytest.mark.slow
def test_rollback_replays_the_batches_and_ends_as_if_nothing_had_happened(tiny_corpus, straight_run, tmp_path) -> None:
    """action rollback: a flipped bit in m before step 5 is found at step 5, the run goes back to
    the checkpoint of step 4 and replays batches 5 and 6 (the data is not to blame): the final
    weights and optimizer state are bitwise those of the run that met no fault."""
    faults = [{"kind": "state", "step": 5, "rank": 0, "key": "m"}]
    settings = tiny_overrides(tiny_corpus, tmp_path / "run", "train.sdc_check.action=rollback", "train.save_interval=2")
    done, records, (state,) = faulty_run(tmp_path, faults, settings, nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rolling back to the last checkpoint" in done.stderr
    (rollback,) = [r for r in records if r.get("event") == "rollback"]
    (violation,) = rollback.pop("violations")
    assert rollback == {
        "step": 4,
        "event": "rollback",
        "sdc_step": 5,
        "checkpoint": "step_00000004",
        "rollbacks": 1,
        "disagreements": [],
    }
    assert (violation["parameter"], violation["element"], violation["rank"]) == (
        state["parameter"],
        state["element"],
        0,
    )
    assert losses(tmp_path / "run") == losses(straight_run)
    expected, actual = stored_tensors(straight_run), stored_tensors(tmp_path / "run")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
