"""The committed `api/_pb` tree is exactly what `make proto` generates from proto/ today."""

from __future__ import annotations

import difflib
from pathlib import Path

from gpuctl.api import codegen

COMMITTED = Path(__file__).resolve().parents[1] / "src" / "gpuctl" / "api" / "_pb"
DIFF_LINES = 40  # enough to see what changed without burying the list of files


def tree(root: Path) -> dict[str, bytes]:
    """Relative path → bytes for every file under `root`, bytecode caches left out."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "_pb"
    written = codegen.generate(out)
    assert written, "codegen wrote no files: is proto/ empty?"
    fresh, committed = tree(out), tree(COMMITTED)

    problems = [
        f"generated but not committed: {name}" for name in sorted(fresh.keys() - committed.keys())
    ]
    problems += [
        f"committed but no longer generated: {name}"
        for name in sorted(committed.keys() - fresh.keys())
    ]
    changed = sorted(
        name for name in fresh.keys() & committed.keys() if fresh[name] != committed[name]
    )
    problems += [f"differs: {name}" for name in changed]
    if changed:
        first = changed[0]
        diff = difflib.unified_diff(
            committed[first].decode(errors="replace").splitlines(),
            fresh[first].decode(errors="replace").splitlines(),
            f"committed/{first}",
            f"generated/{first}",
            lineterm="",
        )
        problems.append("\n".join(list(diff)[:DIFF_LINES]))

    assert not problems, "generated code is stale: run `make proto`\n" + "\n".join(problems)
