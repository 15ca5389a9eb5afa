"""The README's two commands stay true: CI runs the test command verbatim."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_the_readme_test_command():
    main, test = readme_commands()
    assert "ds4kern run" in main and "pytest" in test
    assert test in (ROOT / ".ci" / "run").read_text()


def test_changelog_has_an_entry():
    assert "router_topk" in (ROOT / "CHANGELOG.md").read_text()


def readme_python_block(marker):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return next(b for b in blocks if marker in b)


@pytest.mark.gpu
def test_readme_compressor_example_runs():
    ns = {}
    exec(readme_python_block("compress_decode"), ns)
    cache = ns["cache"]
    assert float(abs(cache[3, 0].astype("float32")).sum()) > 0  # position 3 emitted row 0
