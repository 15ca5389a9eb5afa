"""The README's two commands stay true: CI runs the test command verbatim."""

import re
from pathlib import Path

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
