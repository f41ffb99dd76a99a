"""The `pangu` command as a user meets it: options, and one clear line for what a user can cause."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pangu.cli import build_parser, main
from tests.helpers import structurally_intact_checkpoint, subprocess_env


def test_set_takes_several_values_and_can_repeat():
    args = build_parser().parse_args(["pretrain", "--config", "tiny", "--set", "a.b=1", "c.d=2", "--set", "e.f=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "has no logged training steps yet"),
        ('{"step": 0, "event": "memory"}\n', "has no logged training steps"),
        ('{"step": 1, "loss": 7.0, "lr": 0.1}\n{"step": 2, "lo', None),
    ],
    ids=["empty", "events only", "half-written last line"],
)
def test_plot_reads_what_a_crash_or_an_early_look_leaves(tmp_path, capsys, content, message):
    (tmp_path / "metrics.jsonl").write_text(content)
    status = main(["plot", str(tmp_path)])
    if message is None:
        assert status == 0 and (tmp_path / "curves.png").stat().st_size > 1000
    else:
        assert status == 2 and message in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "a pangu run directory?" in capsys.readouterr().err


def test_ctrl_c_in_any_command_is_one_line(tmp_path):
    """KeyboardInterrupt wherever it comes (here: inside prepare) ends in one line, status 130."""
    code = (
        "import sys\nimport pangu.data.prepare as p\n"
        "def interrupted(*a, **k):\n    raise KeyboardInterrupt\n"
        "p.prepare = interrupted\n"
        "from pangu.cli import entry\nentry(['prepare', '--config', 'tiny', '--set', "
        f"'data.prepared_dir={tmp_path}/p'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert done.returncode == 130
    assert done.stderr.strip().splitlines()[-1] == "pangu prepare: interrupted" and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "raised, status, line",
    [
        ("OSError(errno.ENOSPC, 'No space left on device', '/data/x.bin')", 1, "No space left on device (/data/x.bin)"),
        ("OSError(errno.EROFS, 'Read-only file system', '/ro')", 1, "Read-only file system (/ro)"),
        ("KeyboardInterrupt('SIGTERM')", 130, "interrupted (SIGTERM)"),
    ],
    ids=["disk full", "read-only", "sigterm"],
)
def test_the_environment_refusing_is_one_line_and_a_bug_is_not_hidden(tmp_path, raised, status, line):
    code = (
        "import errno, sys\nimport pangu.data.prepare as p\n"
        f"def fail(*a, **k):\n    raise {raised}\n"
        "p.prepare = fail\n"
        "from pangu.cli import entry\nentry(['prepare', '--config', 'tiny', '--set', "
        f"'data.prepared_dir={tmp_path}/p'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert done.returncode == status and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"pangu prepare: {'error: ' if status == 1 else ''}{line}"
    verbose = subprocess.run(
        [sys.executable, "-c", code.replace("entry(['prepare'", "entry(['-v', 'prepare'")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert verbose.returncode == status and "Traceback" in verbose.stderr  # -v: for a bug report


def test_an_os_error_without_errno_is_a_bug_and_keeps_its_traceback(capsys, monkeypatch):
    import pangu.commands.plot as plot

    def fail(args):
        raise OSError("not from the operating system")

    monkeypatch.setattr(plot, "run", fail)
    with pytest.raises(OSError, match="not from the operating system"):
        main(["plot", "somewhere"])


def test_results_go_to_stdout_and_nothing_else(tmp_path, capsys):
    assert main(["plan", "--config", "tiny", "--gpus", "8", "--gpu-memory", "16GiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpus"] == 8


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--checkpoint", "x", "--prompt", "p", "--temperature", "-1"],
        ["generate", "--checkpoint", "x", "--prompt", "p", "--temperature", "nan"],
        ["generate", "--checkpoint", "x", "--prompt", "p", "--top-p", "2"],
        ["generate", "--checkpoint", "x", "--prompt", "p", "--top-k", "-3"],
        ["generate", "--checkpoint", "x", "--prompt", "p", "--max-new-tokens", "0"],
        ["evaluate", "--config", "tiny", "--checkpoint", "x", "--max-samples", "0"],
        ["evaluate", "--config", "tiny", "--checkpoint", "x", "--task", "sentiment", "--max-examples", "-1"],
        ["plan", "--config", "tiny", "--gpus", "8", "--gpu-memory", "80GiB", "--efficiency", "-1"],
        ["plan", "--config", "tiny", "--gpus", "8", "--gpu-memory", "80GiB", "--tflops", "0"],
        ["plan", "--config", "tiny", "--gpus", "8", "--gpu-memory", "80GiB", "--bandwidth", "0"],
        ["plan", "--config", "tiny", "--gpus", "0", "--gpu-memory", "80GiB"],
        ["plan", "--config", "tiny", "--gpus", "8", "--gpu-memory", "80XB"],
        ["convert", "import-mindspore", "a", "b", "--num-heads", "0"],
    ],
    ids=lambda argv: " ".join(argv[-2:]),
)
def test_every_option_is_checked_against_its_domain(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "is not allowed: expected" in err or "is not a size" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_generate_refuses_an_empty_prompt_in_one_line(straight_run, capsys):
    assert main(["generate", "--checkpoint", str(straight_run), "--prompt", ""]) == 2
    assert "the prompt is empty" in capsys.readouterr().err


def test_warnings_are_pangu_lines_without_python_s_source_line(tmp_path, capsys):
    """A warning a user should read (here: a lost `latest` pointer) is one `[pangu] warning:` line."""
    from pangu.checkpoint import format as fmt

    structurally_intact_checkpoint(fmt.checkpoint_root(tmp_path) / fmt.step_name(3), step=3)
    main(["checkpoint", "info", str(tmp_path)])
    err = capsys.readouterr().err
    assert "[pangu] warning: " in err and "latest is missing" in err
    assert "UserWarning" not in err and "warnings.warn" not in err
