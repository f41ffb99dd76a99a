"""A checkpoint is untrusted input (one may be handed over to be continued or evaluated): whatever
its manifest, index or small files say, every command that reads it ends in one line naming what
is wrong before it builds a network or allocates a tensor from it, no file it names leads out of
it, nothing in it runs code, and `pangu checkpoint verify` finds everything the loaders would."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import xxhash

import pangu
from pangu.checkpoint import format as fmt
from pangu.checkpoint.store import CheckpointError, CorruptCheckpointError
from pangu.checkpoint.weights import write_weights
from pangu.cli import main
from pangu.config import ModelConfig
from pangu.model import declaration
from tests.helpers import RELEASE

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v1"  # format 1, with a 300-piece tokenizer
MODEL = ModelConfig(num_layers=2, hidden_size=32, num_heads=2, vocab_size=300, seq_length=16)


def weights_checkpoint(directory: Path) -> Path:
    """A weights-only checkpoint of MODEL (random weights) carrying the fixture's tokenizer."""
    generator = torch.Generator().manual_seed(0)
    tensors = [(p.name, torch.randn(p.shape, generator=generator)) for p in declaration.parameters(MODEL)]
    return write_weights(directory, MODEL, tensors, tokenizer_path=FIXTURE / "tokenizer.model")


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return weights_checkpoint(tmp_path / "ckpt")


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory) -> Path:
    """A format-2 training checkpoint (RNG files, trainer state, tokenizer and its fingerprint)."""
    out = tmp_path_factory.mktemp("training") / "v2"
    assert main(["checkpoint", "upgrade", str(FIXTURE), str(out)]) == 0
    return out


def relist(path: Path, rel: str, manifest: dict) -> None:
    """The manifest's entry of a file, as a forger would write it: its size and checksum."""
    data = (path / rel).read_bytes()
    manifest["files"][rel] = {"bytes": len(data), "xxh3": xxhash.xxh3_64_intdigest(data)}


def edit(path: Path, change: Callable[[Path, dict], None], relisted: tuple[str, ...] = ()) -> None:
    """Changes a checkpoint with `change(path, manifest)`; the manifest then lists `relisted`
    files with their new sizes and checksums."""
    manifest = json.loads((path / "manifest.json").read_text())
    change(path, manifest)
    for rel in relisted:
        relist(path, rel, manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def edit_index(path: Path, change: Callable[[dict], None]) -> None:
    index_file = path / "tensors" / "index.json"
    index = json.loads(index_file.read_text())
    change(index)
    index_file.write_text(json.dumps(index))
    edit(path, lambda *_: None, relisted=("tensors/index.json",))


def first_piece(name: str) -> Callable[[dict], dict]:
    return lambda index: next(p for p in index["pieces"] if p["name"] == name)


def one_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"pangu {command}: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The model a manifest declares


def generate(path: Path) -> list[str]:
    return ["generate", "--checkpoint", str(path), "--prompt", "中国"]


def evaluate(path: Path) -> list[str]:
    return ["evaluate", "--config", "tiny", "--checkpoint", str(path)]


COMMANDS = {
    "info": lambda path: ["checkpoint", "info", str(path)],
    "upgrade": lambda path: ["checkpoint", "upgrade", str(path), str(path.with_name("upgraded"))],
    "export-hf": lambda path: ["convert", "export-hf", str(path), str(path.with_name("hf"))],
    "generate": generate,
    "evaluate": evaluate,
}


@pytest.mark.parametrize(
    "model, commands",
    [
        ({"num_heads": 0}, list(COMMANDS)),
        ({"num_layers": 100000}, ["info", "upgrade", "export-hf"]),  # (the old code built it in the others)
        ({"hidden_size": 10**12, "num_heads": 1}, ["info", "export-hf"]),
        ({"activation": "relu"}, ["info", "generate"]),
    ],
    ids=["no heads", "100000 layers", "a huge hidden size", "an unknown activation"],
)
def test_a_manifest_model_that_cannot_be_built_is_one_line_in_every_command(checkpoint, capsys, model, commands):
    edit(checkpoint, lambda _, manifest: manifest["model"].update(model))
    capsys.readouterr()
    for command in commands:
        argv = COMMANDS[command](checkpoint)
        assert main(argv) == 2, command
        line = one_line(capsys.readouterr().err, argv[0])
        assert "manifest.json is corrupt: " in line, line
        assert "model." in line or "parameter elements, more than its tensor files" in line, line
    assert main(["checkpoint", "verify", str(checkpoint), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == "corrupt" and "manifest.json is corrupt" in err
    with pytest.raises(CorruptCheckpointError, match="manifest.json is corrupt"):
        pangu.load(checkpoint)


def test_a_resume_or_init_from_passes_over_a_manifest_of_an_impossible_model(tmp_path):
    from tests.helpers import structurally_intact_checkpoint

    root = fmt.checkpoint_root(tmp_path)
    structurally_intact_checkpoint(root / fmt.step_name(2), 2)
    newer = structurally_intact_checkpoint(root / fmt.step_name(4), 4)
    edit(newer, lambda _, manifest: manifest["model"].update(num_layers=100000))
    with pytest.warns(
        UserWarning, match=r"step_00000004/manifest.json is corrupt: its model has .* using step_00000002"
    ):
        assert [p.name for p in fmt.intact_checkpoints(tmp_path)] == ["step_00000002"]
    with pytest.raises(CorruptCheckpointError, match="step_00000004/manifest.json is corrupt"):
        fmt.read_manifest(newer)  # train.init_from reads the manifest of the checkpoint it is given


# ---------------------------------------------------------------------------------------------
# Paths


def outside_file(path: Path, manifest: dict) -> None:
    shutil.copyfile(path / "tensors" / "rank00000.bin", path.parent / "outside.bin")
    manifest["files"]["../outside.bin"] = manifest["files"]["tensors/rank00000.bin"]


def absolute_file(path: Path, manifest: dict) -> None:
    manifest["files"][str(path.parent / "outside.bin")] = manifest["files"]["tensors/rank00000.bin"]


def linked_out(name: str):
    def change(path: Path, manifest: dict) -> None:
        target = path.parent / f"outside-{Path(name).name}"
        shutil.move(path / name, target)
        (path / name).symlink_to(target)

    return change


@pytest.mark.parametrize(
    "change, found",
    [
        (outside_file, "'../outside.bin' leads outside"),
        (absolute_file, "outside.bin' leads outside"),
        (linked_out("tensors/rank00000.bin"), "through a symbolic link"),
        (linked_out("tokenizer.model"), "through a symbolic link"),
        (linked_out("tensors"), "through a symbolic link"),
    ],
    ids=["..", "an absolute path", "a tensor file linked out", "the tokenizer linked out", "tensors/ linked out"],
)
def test_no_file_a_manifest_names_leads_out_of_the_checkpoint(checkpoint, capsys, change, found):
    edit(checkpoint, change)
    with pytest.raises(CorruptCheckpointError, match=found):
        pangu.load(checkpoint)
    assert main(["checkpoint", "verify", str(checkpoint), "--quiet"]) == 1
    assert found in capsys.readouterr().err


@pytest.mark.parametrize(
    "file", ["../ckpt/tensors/rank00000.bin", "/etc/passwd", "sub/rank00000.bin", "index.json"], ids=str
)
def test_no_file_an_index_names_leads_out_of_the_tensors(checkpoint, file):
    edit_index(checkpoint, lambda index: first_piece(declaration.POSITION_EMBEDDING_WEIGHT)(index).update(file=file))
    with pytest.raises(CorruptCheckpointError, match=r"index.json is corrupt: piece \d+ "):
        pangu.load(checkpoint)


def test_an_upgrade_reads_and_writes_only_inside_its_checkpoints(tmp_path, capsys):
    """A format-1 entry `../beside` would be read beside SRC and written beside OUT."""
    src = tmp_path / "src" / "ckpt"
    shutil.copytree(FIXTURE, src)
    (src.parent / "beside").write_text("the user's")
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["files"]["../beside"] = {"bytes": 10, "sha256": hashlib.sha256(b"the user's").hexdigest()}
    (src / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "out").mkdir()
    assert main(["checkpoint", "upgrade", str(src), str(tmp_path / "out" / "v2")]) == 2
    assert "'../beside' leads outside" in one_line(capsys.readouterr().err, "checkpoint")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Pieces and the index


@pytest.mark.parametrize(
    "change, found",
    [
        (lambda piece: piece.pop("xxh3"), "has no checksum"),
        (lambda piece: piece.update(full_shape=[10**15], index=[[0, 10**15]], flat=[0, 10**15]), "the model declares"),
        (lambda piece: piece.update(offset=10**15), "past the end of rank00000.bin"),
        (lambda piece: piece.update(flat=[0, 10**9]), "outside its box"),
        (lambda piece: piece.update(index=[[0, 16], [0, 64]]), "does not lie in its full shape"),
        (lambda piece: piece.update(name="blocks.7.mlp.secret.weight"), "a parameter the model does not declare"),
        (lambda piece: piece.update(offset="0"), "offset = '0' is not allowed: expected an integer"),
        (lambda piece: piece.update(dtype="float64"), "dtype = 'float64' is not allowed"),
        (lambda piece: piece.pop("key"), "missing key 'pieces[2].key'"),
    ],
    ids=[
        "no checksum",
        "1e15 elements",
        "past its file",
        "flat range outside its box",
        "box outside the tensor",
        "an undeclared parameter",
        "offset a string",
        "a dtype pangu does not store",
        "no key",
    ],
)
def test_a_damaged_piece_is_found_before_anything_is_allocated(checkpoint, capsys, change, found):
    edit_index(checkpoint, lambda index: change(index["pieces"][2]))
    with pytest.raises(CorruptCheckpointError, match=rf"index.json is corrupt: .*{re.escape(found)}"):
        pangu.load(checkpoint)
    assert main(["checkpoint", "verify", str(checkpoint), "--quiet"]) == 1
    assert found in capsys.readouterr().err


@pytest.mark.parametrize(
    "index", [b"\x00not json", b"[]", b'{"pieces": 7}', b'{"pieces": [], "more": 1}'], ids=lambda b: b.decode()[:12]
)
def test_an_index_of_any_shape_is_one_line(checkpoint, capsys, index):
    (checkpoint / "tensors" / "index.json").write_bytes(index)
    edit(checkpoint, lambda *_: None, relisted=("tensors/index.json",))
    with pytest.raises(CorruptCheckpointError, match="index.json is corrupt"):
        pangu.load(checkpoint)
    assert main(["checkpoint", "info", str(checkpoint)]) == 2
    assert "index.json is corrupt" in one_line(capsys.readouterr().err, "checkpoint")


# ---------------------------------------------------------------------------------------------
# What verify checks besides bytes


def rng_that_runs_code(marker: Path):
    class RunsCode:
        def __reduce__(self):
            return (Path.touch, (marker,))

    def change(path: Path, manifest: dict) -> None:
        (path / "rng").mkdir(exist_ok=True)
        torch.save({"torch": RunsCode(), "tracker": {}}, path / "rng" / "rank00000.pt")
        relist(path, "rng/rank00000.pt", manifest)

    return change


def foreign_tokenizer(path: Path, manifest: dict) -> None:
    shutil.copyfile(RELEASE / "vocab.model", path / "tokenizer.model")
    relist(path, "tokenizer.model", manifest)


def unchecked_trainer_state(path: Path, manifest: dict) -> None:
    manifest["files"]["trainer.json"] = {"bytes": manifest["files"]["trainer.json"]["bytes"]}


def trainer_state(change: dict):
    def damage(path: Path, manifest: dict) -> None:
        trainer = json.loads((path / "trainer.json").read_text())
        (path / "trainer.json").write_text(json.dumps({**trainer, **change}))
        relist(path, "trainer.json", manifest)

    return damage


@pytest.mark.parametrize(
    "damage, found",
    [
        (foreign_tokenizer, "is not the tokenizer checkpoint"),
        (trainer_state({"sampler": {"seed": 1}}), "trainer.json is corrupt: missing key 'sampler.consumed_samples'"),
        (unchecked_trainer_state, "trainer.json is not checked: the manifest lists no checksum for it"),
    ],
    ids=["another tokenizer", "a trainer state", "an unchecked file"],
)
def test_verify_reads_what_the_loaders_read_as_they_read_it(training_checkpoint, tmp_path, capsys, damage, found):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(training_checkpoint, checkpoint)
    edit(checkpoint, damage)
    assert main(["checkpoint", "verify", str(checkpoint), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert out.strip() == "corrupt" and found in err


def test_a_pickle_an_older_checkpoint_carries_is_never_unpickled(training_checkpoint, tmp_path, capsys):
    """Older checkpoints hold each rank's RNG states as torch.save pickles (rng/rank{R}.pt); no
    loader reads them any more (dropout is seeded by the step and the micro-batch), and neither
    does verify beyond their checksums: a hostile one runs no code anywhere."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(training_checkpoint, checkpoint)
    marker = tmp_path / "code-ran"
    edit(checkpoint, rng_that_runs_code(marker))
    assert main(["checkpoint", "verify", str(checkpoint), "--quiet"]) == 0
    assert main(["checkpoint", "upgrade", str(checkpoint), str(tmp_path / "upgraded")]) == 2  # already format 2
    capsys.readouterr()
    assert not marker.exists()


def test_a_checkpoint_carrying_another_tokenizer_than_it_was_trained_with_is_refused(training_checkpoint, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(training_checkpoint, checkpoint)
    edit(checkpoint, foreign_tokenizer)
    with pytest.raises(CorruptCheckpointError, match="tokenizer.model is not the tokenizer checkpoint .* was trained"):
        pangu.load(checkpoint)
    with pytest.raises(CheckpointError, match="is not the tokenizer"):
        from pangu.convert.huggingface import export_hf

        export_hf(checkpoint, tmp_path / "hf")


# ---------------------------------------------------------------------------------------------
# Temporary directories


@pytest.mark.parametrize("command", ["upgrade", "export-hf", "import-hf", "import-mindspore"])
def test_a_users_directory_named_like_a_temporary_one_survives(tmp_path, capsys, command):
    out = tmp_path / "out"
    users = tmp_path / ".tmp_out"
    users.mkdir()
    (users / "precious.txt").write_text("mine")
    source = weights_checkpoint(tmp_path / "weights")
    if command == "upgrade":
        argv = ["checkpoint", "upgrade", str(FIXTURE), str(out)]
    elif command == "export-hf":
        argv = ["convert", "export-hf", str(source), str(out)]
    elif command == "import-hf":
        from pangu.convert.huggingface import export_hf

        argv = ["convert", "import-hf", str(export_hf(source, tmp_path / "hf")), str(out)]
    else:
        import numpy as np

        from pangu.convert.mindspore.ckpt import write_mindspore_ckpt
        from tests.model.numpy_pangu import random_ms_params

        params = random_ms_params(2, 32, 2, 128, 300, 16, np.random.default_rng(0))
        write_mindspore_ckpt(tmp_path / "release.ckpt", params.items())
        argv = ["convert", "import-mindspore", str(tmp_path / "release.ckpt"), str(out), "--num-heads", "2"]
    capsys.readouterr()
    assert main(argv) == 2
    assert "was not made by pangu" in one_line(capsys.readouterr().err, argv[0])
    assert (users / "precious.txt").read_text() == "mine" and not out.exists()


@pytest.mark.slow
def test_checkpoints_carry_the_tokenizer_the_run_started_with(tiny_corpus, tmp_path):
    """Re-preparing the data under a running run (here its tokenizer.model is replaced after every
    save) does not give the later checkpoints a foreign tokenizer."""
    from tests.helpers import run_pretrain, tiny_overrides

    corpus = tmp_path / "prepared"
    shutil.copytree(tiny_corpus, corpus)
    started_with = (corpus / "tokenizer.model").read_bytes()
    reprepared_after_each_save = (
        "from pathlib import Path\nfrom pangu.pretrain.trainer import Trainer\n"
        "save = Trainer.save\n"
        "def save_then_reprepare(self):\n"
        "    path = save(self)\n"
        f"    (Path(self.config.data.prepared_dir) / 'tokenizer.model').write_bytes(Path({str(RELEASE)!r}, 'vocab.model').read_bytes())\n"
        "    return path\n"
        "Trainer.save = save_then_reprepare\n"
    )
    out = tmp_path / "run"
    settings = ["train.save_interval=2", "train.keep_checkpoints=3"]
    result = run_pretrain(tiny_overrides(corpus, out, *settings), prelude=reprepared_after_each_save)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = fmt.step_dirs(fmt.checkpoint_root(out))
    assert [p.name for p in saved] == ["step_00000006", "step_00000004", "step_00000002"]
    for checkpoint in saved:
        assert (checkpoint / "tokenizer.model").read_bytes() == started_with, checkpoint.name
        assert main(["checkpoint", "verify", str(checkpoint), "--quiet"]) == 0
