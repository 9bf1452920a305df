"""The import-linter contracts in pyproject.toml: kept by the tree, broken by each violation.

`scripts/dev.sh test` runs `lint-imports` on the real tree. These tests show that every
contract has teeth: each copies the four root packages and pyproject.toml to a scratch
directory, adds one import the contract forbids, and expects exactly that contract to
break. The worktree itself is never touched.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

# contract name (start) -> (file in the copy, line appended to it)
VIOLATIONS: dict[str, tuple[str, str]] = {
    "Only proxy.kernel runs tools": ("proxy/_probe.py", "import subprocess"),
    "The product never imports the lab, the tests": ("proxy/_probe.py", "import lab.netns"),
    "Backends use proxy.model": ("proxy/backends/_probe.py", "import proxy.config.settings"),
    "Backends are independent of each other": (
        "proxy/backends/nftables/_probe.py",
        "import proxy.backends.iptables.render",
    ),
    "proxy.model imports nothing from proxy": ("proxy/model.py", "import proxy.parse"),
    "proxy.kernel imports nothing from proxy": ("proxy/kernel/_probe.py", "import proxy.init"),
}


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS)],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of what import-linter reads: the root packages and pyproject.toml."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("proxy", "lab", "tests", "benchmarks"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_tree_keeps_every_contract(tree: Path) -> None:
    done = lint(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(VIOLATIONS)} kept, 0 broken." in done.stdout


@pytest.mark.parametrize("contract", VIOLATIONS)
def test_each_contract_breaks_when_violated(tree: Path, contract: str) -> None:
    path, line = VIOLATIONS[contract]
    with open(tree / path, "a", encoding="utf-8") as out:
        out.write(f"\n{line}  # a violation\n")
    done = lint(tree)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 broken." in done.stdout
    broken = done.stdout.split("Broken contracts", 1)[1]
    assert contract in broken
