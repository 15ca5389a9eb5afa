"""Tuning environment variables: a malformed value warns, naming the variable, and the default
stands; ``import ds4kern`` never breaks on one."""

import os
import subprocess
import sys

import pytest

from ds4kern.core.env import EnvWarning, env_int


@pytest.mark.parametrize("raw,kw,want", [("abc", {}, 7), ("-3", {"minimum": 0}, 7), ("3", {"choices": (1, 2)}, 7),
                                         ("12", {"minimum": 0}, 12), ("", {}, 7), (" 5 ", {}, 5)])
def test_env_int(monkeypatch, raw, kw, want):
    monkeypatch.setenv("DS4KERN_TEST_KNOB", raw)
    bad = want == 7 and raw.strip() != ""
    if bad:
        with pytest.warns(EnvWarning, match="DS4KERN_TEST_KNOB"):
            assert env_int("DS4KERN_TEST_KNOB", 7, **kw) == want
    else:
        assert env_int("DS4KERN_TEST_KNOB", 7, **kw) == want


def test_malformed_tuning_variable_does_not_break_import():
    env = {**os.environ, "DS4KERN_ROUTER_ROWS_MIN_TOKENS": "abc", "DS4KERN_ROUTER_ROWS_LPT": "3"}
    r = subprocess.run([sys.executable, "-W", "always", "-c",
                        "import ds4kern.ops.router.rule as r, ds4kern.ops.router.kernels as k;"
                        "print(r.ROWS_MIN_TOKENS, k.ROWS_LPT_SETTING)"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["16384", "2"]
    assert "DS4KERN_ROUTER_ROWS_MIN_TOKENS" in r.stderr and "DS4KERN_ROUTER_ROWS_LPT" in r.stderr
