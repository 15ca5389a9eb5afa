"""The README stays true: CI runs its test command verbatim, and every ```python block runs.

Blocks that start with ``# needs a GPU (CuPy)`` run only where a GPU is (marked ``gpu``); every
other block runs here on the CPU (numpy in, numpy out: the reference backend), each in a fresh
namespace, inside a temporary folder.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_MARK = "# needs a GPU"


def readme_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_the_readme_test_command():
    main, test = readme_commands()
    assert "ds4kern run" in main and "pytest" in test
    assert test in (ROOT / ".ci" / "run").read_text()


def test_changelog_has_an_entry():
    assert "router_topk" in (ROOT / "CHANGELOG.md").read_text()


def python_blocks():
    """(line number, code) of every ```python block of the README."""
    text = (ROOT / "README.md").read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1))
            for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


CPU_BLOCKS = [b for b in python_blocks() if not b[1].lstrip().startswith(GPU_MARK)]
GPU_BLOCKS = [b for b in python_blocks() if b[1].lstrip().startswith(GPU_MARK)]


def run_block(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block writes nothing outside the temporary folder
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": f"readme_block_{line}"})


def test_readme_has_python_blocks():
    assert len(CPU_BLOCKS) >= 5 and GPU_BLOCKS


@pytest.mark.parametrize("line,code", CPU_BLOCKS, ids=[f"README.md:{ln}" for ln, _ in CPU_BLOCKS])
def test_readme_python_block_runs_on_cpu(line, code, tmp_path, monkeypatch):
    run_block(line, code, tmp_path, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("line,code", GPU_BLOCKS, ids=[f"README.md:{ln}" for ln, _ in GPU_BLOCKS])
def test_readme_python_block_runs_on_gpu(line, code, tmp_path, monkeypatch):
    run_block(line, code, tmp_path, monkeypatch)


def test_doc_links_exist():
    """Relative links of README.md and ARCHITECTURE.md name files that exist."""
    for doc in ("README.md", "ARCHITECTURE.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (ROOT / doc).read_text()):
            assert (ROOT / target).exists(), f"{doc} links to {target}, which does not exist"
