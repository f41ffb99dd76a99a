"""The package map holds: imports run one way, the model knows nothing of the distributed stack,
the fast paths import no torch, and no module grows past what a newcomer can read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PANGU = Path(__file__).resolve().parents[2] / "pangu"
MAX_LINES = 600

# package -> the pangu packages it may import (docs/architecture.md draws the same map)
BASE = {"schema", "files", "config"}
ALLOWED = {
    "schema": set(),
    "files": set(),
    "config": {"schema", "files"},
    "data": BASE,
    "model": BASE,
    "optim": BASE,
    "parallel": BASE | {"data", "model", "optim"},
    "checkpoint": BASE | {"data", "model", "optim", "parallel"},
    "evaluation": BASE | {"data", "model", "optim", "parallel", "checkpoint"},
    "pretrain": BASE | {"data", "model", "optim", "parallel", "checkpoint", "evaluation"},
    "convert": BASE | {"data", "model", "checkpoint"},
}
TOP = {"commands", "cli", "__init__", "__main__"}  # may import anything


def package_of(path: Path) -> str:
    return path.relative_to(PANGU).parts[0].removesuffix(".py")


def pangu_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported pangu package) of every import in the file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "pangu":  # from pangu import config
            modules = [f"pangu.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        found += [(node.lineno, m.split(".")[1]) for m in modules if m.startswith("pangu.")]
    return found


SOURCES = sorted(PANGU.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PANGU)))
def test_imports_run_one_way(path: Path):
    package = package_of(path)
    if package in TOP:
        return
    allowed = ALLOWED[package] | {package}
    backward = [f"line {line}: pangu.{target}" for line, target in pangu_imports(path) if target not in allowed]
    assert not backward, f"{path.relative_to(PANGU)} ({package}) imports against the one-way rule: {backward}"


# shipped into `pangu convert export-hf` directories as transformers remote code: loaded where pangu
# may not be installed, so it stands alone (the import rule above holds for it trivially)
HF_CODE = PANGU / "convert" / "hf_code"
HF_CODE_MAY_IMPORT = {"torch", "transformers", "sentencepiece", "jieba"}


def test_the_shipped_transformers_code_imports_no_pangu():
    files = sorted(HF_CODE.glob("*.py"))
    assert {f.name for f in files} == {"configuration_pangu.py", "modeling_pangu.py", "tokenization_pangu.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            elif isinstance(node, ast.ImportFrom):  # relative: a sibling that ships with it
                assert node.level == 1 and (HF_CODE / f"{node.module}.py").is_file(), (path.name, node.module)
                continue
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top in HF_CODE_MAY_IMPORT or top in sys.stdlib_module_names, (path.name, module)


def test_every_package_is_placed_on_the_map():
    packages = {package_of(path) for path in SOURCES}
    assert packages <= set(ALLOWED) | TOP, packages - set(ALLOWED) - TOP


def test_the_model_knows_nothing_of_the_distributed_stack():
    for path in (PANGU / "model").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert not name.startswith(("torch.distributed", "deepspeed", "megatron")), (path.name, name)


def test_no_module_is_longer_than_a_newcomer_reads():
    long = {str(p.relative_to(PANGU)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_fast_paths_import_no_torch():
    """`pangu --help`, the planner, the network's declaration, sizes and the optimizer registry."""
    code = (
        "import sys\n"
        "import pangu.cli, pangu.model.declaration, pangu.model.sizes, pangu.optim.registry, pangu.parallel.planner\n"
        "pangu.cli.build_parser()\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'megatron') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
