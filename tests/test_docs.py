"""The documentation's examples run: every ```python block of README.md and docs/*.md.

A page's blocks run in order in one namespace (a later block may use what an earlier one
defined), each page in a fresh temporary working directory. A block whose fence is directly
preceded by the line ``<!-- no-run -->`` is skipped (multi-process or long runs only); shell
blocks are never run. Blocks run with ``__name__ == "__docs__"``, so an
``if __name__ == "__main__":`` part (a script's entry point) is defined but not started.
A failure names the page and the line of the block's opening fence; tracebacks carry the
page's own line numbers. Relative links of every page must point at a file of the repository
(those pages, benchmarks/README.md and every page of benchmarks/results/), and
benchmarks/results/README.md must be what ``python benchmarks/results_index.py`` writes.
"""
from __future__ import annotations

import random
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULT_PAGES = sorted((ROOT / "benchmarks" / "results").rglob("*.md"))
NO_RUN = "<!-- no-run -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^`]*)$")
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int          # 1-based line of the opening fence
    language: str
    code: str
    run: bool

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page (indented fences, as in a list item, included)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, ticks = opening["indent"], opening["ticks"]
        language = opening["info"].strip().split(" ")[0].lower()
        end = i + 1
        while end < len(lines) and not re.match(
                rf"^{re.escape(indent)}{ticks}`*\s*$", lines[end]):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: code block never closed")
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                for line in lines[i + 1:end]]
        previous = lines[i - 1].strip() if i > 0 else ""
        found.append(Block(page, i + 1, language, "\n".join(body) + "\n", previous != NO_RUN))
        i = end + 1
    return found


def python_blocks(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.language in ("python", "py")]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.fixture
def global_state():
    """The examples seed the random generators and fedsim's runs set torch's thread count and
    cuDNN flags: put them back for the tests that run after."""
    threads = torch.get_num_threads()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    rngs = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    torch.set_num_threads(threads)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    random.setstate(rngs[0])
    np.random.set_state(rngs[1])
    torch.set_rng_state(rngs[2])


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_examples_run(page: Path, tmp_path, monkeypatch, capsys, global_state):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in python_blocks(page):
        if not block.run:
            continue
        # padded so that a traceback's line numbers are the page's own
        source = "\n" * block.line + block.code
        try:
            code = compile(source, str(block.page.relative_to(ROOT)), "exec")
            exec(code, namespace)
        except (Exception, SystemExit) as err:  # SystemExit too: a block must not end the run
            out = capsys.readouterr()
            failure = (f"the python block at {block.where} failed: {type(err).__name__}: "
                       f"{err}\n\n{traceback.format_exc()}\n"
                       f"its output:\n{out.out[-4000:]}{out.err[-4000:]}")
            break
    else:
        return
    pytest.fail(failure, pytrace=False)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_page_has_a_runnable_example(page: Path):
    runnable = [b for b in python_blocks(page) if b.run]
    assert runnable, f"{page_id(page)} has no runnable ```python block"


@pytest.mark.parametrize("page", [*PAGES, ROOT / "benchmarks" / "README.md", *RESULT_PAGES],
                         ids=page_id)
def test_relative_links_resolve(page: Path):
    text = page.read_text(encoding="utf-8")
    code_lines = {line for b in blocks(page)
                  for line in range(b.line, b.line + b.code.count("\n") + 2)}
    for number, line in enumerate(text.splitlines(), 1):
        if number in code_lines:
            continue
        for match in LINK.finditer(line):
            target = match["target"]
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), \
                f"{page_id(page)}:{number}: link to {target!r}, which does not exist"
            assert path.is_relative_to(ROOT), \
                f"{page_id(page)}:{number}: link to {target!r}, outside the repository"


def test_results_index_is_current():
    """The index of recorded results lists them as they are: after adding, moving or removing a
    result, run ``python benchmarks/results_index.py``."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "results_index.py"),
                           "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout
