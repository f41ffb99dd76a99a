"""A run owns its output directory, and nothing it did not write is taken for its own: a
config.yaml or metrics.jsonl of another run, or pangu's names in a directory that is not a run's,
are refused naming them before anything is written; an older pangu's run directory and
checkpoints handed over are taken over; a job's log beside them is left alone; and a run whose
checkpoints are gone keeps its earlier metrics aside."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pangu.config import load_config
from pangu.pretrain import run_directory
from pangu.pretrain.run_directory import LOCK_FILE, RUN_MARKER, accept, claim
from pangu.schema import ConfigError
from tests.helpers import run_pretrain, structurally_intact_checkpoint, tiny_overrides

CONFIG = load_config("tiny")


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def accepted_run(directory: Path, steps: int = 0) -> Path:
    """A directory a run has been accepted in, having logged `steps` steps."""
    claim(directory).close()
    accept(directory, CONFIG, start_step=0)
    with open(directory / "metrics.jsonl", "a") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "loss": 5.0 - step}) + "\n")
    return directory


@pytest.mark.parametrize(
    "files",
    [
        {"config.yaml": "model:\n  hidden_size: 4096\n"},
        {"metrics.jsonl": '{"step": 100, "loss": 2.0}\n', "notes.txt": "mine"},
        {"tensorboard/events.out": "x", "checkpoints/mine.pt": "x"},
    ],
    ids=["a config.yaml", "a metrics.jsonl", "checkpoints and tensorboard"],
)
def test_pangus_names_holding_what_it_did_not_write_are_refused_before_anything_is_written(tmp_path, files):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as refused:
        claim(tmp_path)
    for name in files:
        if name != "notes.txt":
            assert name.split("/")[0] in str(refused.value)
    assert "which this run did not write" in str(refused.value) and "notes.txt" not in str(refused.value)
    assert snapshot(tmp_path) == before and not (tmp_path / LOCK_FILE).exists()


def test_a_config_or_metrics_of_another_run_in_a_run_directory_is_refused(tmp_path):
    other = accepted_run(tmp_path / "other", steps=3)
    mine = accepted_run(tmp_path / "mine", steps=2)
    for name in ("config.yaml", "metrics.jsonl"):
        kept = (mine / name).read_bytes()
        (mine / name).write_bytes((other / name).read_bytes())
        with pytest.raises(ConfigError, match=f"holds {name}, which this run did not write"):
            claim(mine)
        (mine / name).write_bytes(kept)
    claim(mine).close()


def test_a_new_or_empty_directory_and_a_jobs_log_beside_a_run_are_fine(tmp_path):
    claim(tmp_path / "new").close()
    (tmp_path / "empty").mkdir()
    claim(tmp_path / "empty").close()
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "slurm-17.out").write_text("[slurm.sbatch] job 17, run 1")
    claim(tmp_path / "job").close()
    accept(tmp_path / "job", CONFIG, start_step=0)
    assert (tmp_path / "job" / "slurm-17.out").read_text() == "[slurm.sbatch] job 17, run 1"
    marker = json.loads((tmp_path / "job" / RUN_MARKER).read_text())
    assert (tmp_path / "job" / "config.yaml").read_text().startswith(f"# pangu run {marker['run']} ")
    assert load_config(tmp_path / "job" / "config.yaml") == CONFIG  # the identity is a comment
    first = json.loads((tmp_path / "job" / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"step": 0, "event": "run", "run": marker["run"]}


def test_an_older_pangus_run_directory_and_handed_over_checkpoints_are_taken_over(tmp_path):
    older = tmp_path / "older"  # as a pangu before run markers left it: its lock, config and metrics
    older.mkdir()
    (older / LOCK_FILE).write_text("host h, pid 1\n")
    (older / "config.yaml").write_text(CONFIG.dump())
    (older / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n{"step": 2, "loss": 3.0}\n')
    claim(older).close()
    accept(older, CONFIG, start_step=2)
    records = [json.loads(line) for line in (older / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "run" and records[1:] == [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}]
    claim(older).close()  # now a run directory of this pangu

    handed = tmp_path / "handed"
    structurally_intact_checkpoint(handed / "checkpoints" / "step_00000002", 2)
    claim(handed).close()


def test_a_run_whose_checkpoints_are_gone_keeps_its_earlier_metrics_aside(tmp_path):
    run = accepted_run(tmp_path / "run", steps=5)
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events").write_text("curves")
    earlier = (run / "metrics.jsonl").read_text()
    claim(run).close()
    accept(run, CONFIG, start_step=0)  # no checkpoint to resume from: the run starts again
    assert (run / "metrics.jsonl.set-aside-1").read_text() == earlier
    assert (run / "tensorboard.set-aside-1" / "events").read_text() == "curves"
    assert [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()] == ["run"]
    claim(run).close()


def test_an_interrupted_takeover_is_taken_over_again(tmp_path, monkeypatch):
    older = tmp_path / "older"
    older.mkdir()
    (older / LOCK_FILE).write_text("")
    (older / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')
    monkeypatch.setattr(run_directory, "write_json_atomic", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        accept(older, CONFIG, start_step=1)  # stamped metrics.jsonl and config.yaml, no marker yet
    monkeypatch.undo()
    claim(older).close()
    accept(older, CONFIG, start_step=1)
    records = [json.loads(line) for line in (older / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in records] == ["run", None]
    claim(older).close()


def test_a_damaged_marker_is_one_line(tmp_path):
    accepted_run(tmp_path)
    (tmp_path / RUN_MARKER).write_text('{"run": 7, "created": "today"}')
    with pytest.raises(ConfigError, match=r"\.pangu-run is damaged \(run = 7 is not allowed: expected a string\)"):
        claim(tmp_path)


@pytest.mark.slow
def test_pretrain_refuses_an_output_directory_holding_another_runs_config(tiny_corpus, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "config.yaml").write_text("# the user's own\n")
    result = run_pretrain(tiny_overrides(tiny_corpus, out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds config.yaml, which this run did not write" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
