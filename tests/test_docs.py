"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one file run in order, in one fresh interpreter (a later block may use what an
earlier one defined), with the repository on ``PYTHONPATH`` and the prepared digits as
``$TFDS_DATA_DIR``. A block that truly cannot run offline on a CPU (it needs a trained workdir,
CIFAR or ImageNet files, a pod, or it is a fragment of the trainer's own loop) is marked by a
line ``<!-- not runnable: why -->`` right before its fence and is skipped; the reason is
required.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest
from procs import ROOT, with_repo_on_path, xla_flags

DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                              for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
_FENCE = re.compile(r"^```python\s*$")
_MARK = re.compile(r"^<!--\s*not runnable\b[^:]*:\s*(\S.*?)\s*-->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, reason)`` per ```python block of markdown ``text``: the 1-based line
    of its fence, its code, and the reason of a ``<!-- not runnable: ... -->`` mark on the
    line right before the fence (None when it is to run)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if _FENCE.match(lines[i]):
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].rstrip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"line {start + 1}: a ```python block is never closed")
            mark = _MARK.match(lines[start - 1].strip()) if start else None
            blocks.append((start + 1, "\n".join(body) + "\n", mark.group(1) if mark else None))
        i += 1
    return blocks


def run_blocks(blocks: list[tuple[int, str, str | None]], name: str, env: dict, cwd: str,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the unmarked blocks in one fresh interpreter; each block is preceded by a
    comment naming its file and line, so that a traceback points at the doc."""
    script = "".join(f"# {name}:{line}\n{code}" for line, code, reason in blocks
                     if reason is None)
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, timeout=timeout,
                          capture_output=True, text=True)


def test_blocks_and_marks_are_found():
    doc = "\n".join([
        "text", "```python", "a = 1", "```",
        "<!-- not runnable: needs a trained workdir -->", "```python", "run()", "```",
        "```bash", "ls", "```",
        "<!-- not runnable as is: a pod -->", "```python", "pod()", "```",
        "<!-- not runnable -->", "```python", "b = a + 1", "```",
    ])
    assert python_blocks(doc) == [(2, "a = 1\n", None), (6, "run()\n", "needs a trained workdir"),
                                  (13, "pod()\n", "a pod"), (17, "b = a + 1\n", None)]
    with pytest.raises(ValueError, match="line 2"):
        python_blocks("x\n```python\nnever closed\n")


def test_a_failing_block_fails(tmp_path):
    blocks = python_blocks("```python\nx = 2\n```\n```python\nassert x == 3, 'x is 2'\n```\n")
    result = run_blocks(blocks, "fake.md", dict(os.environ), str(tmp_path), timeout=60)
    assert result.returncode != 0
    assert "x is 2" in result.stderr and "fake.md:4" in _script_line(result.stderr, blocks)


def _script_line(stderr: str, blocks) -> str:
    """The ``# file:line`` comment above the failing line of a ``-c`` script's traceback."""
    number = int(re.findall(r'File "<string>", line (\d+)', stderr)[-1])
    script = "".join(f"# fake.md:{line}\n{code}" for line, code, _ in blocks).splitlines()
    return next(s for s in reversed(script[:number]) if s.startswith("# fake.md:"))


def test_readme_library_example_is_run():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## The library"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    blocks = python_blocks(section)
    assert blocks and all(reason is None for _, _, reason in blocks)


@pytest.mark.parametrize("name", DOCS)
def test_doc_blocks_run(name, data_dir, tmp_path):
    blocks = python_blocks(open(os.path.join(ROOT, name)).read())
    if not any(reason is None for _, _, reason in blocks):
        pytest.skip(f"{name}: no runnable python block")
    env = with_repo_on_path(dict(os.environ, TFDS_DATA_DIR=data_dir, TF_CPP_MIN_LOG_LEVEL="3",
                                 XLA_FLAGS=xla_flags(1)))
    result = run_blocks(blocks, name, env, str(tmp_path))
    assert result.returncode == 0, f"{name}: a python block failed:\n{result.stderr[-3000:]}"
