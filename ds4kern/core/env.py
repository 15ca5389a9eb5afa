"""Reading ds4kern's tuning environment variables: a malformed value warns, naming the variable,
and the default is kept (it never breaks ``import ds4kern``)."""

from __future__ import annotations

import os
import warnings
from typing import Optional

__all__ = ["env_int", "EnvWarning"]


class EnvWarning(UserWarning):
    """A ds4kern environment variable has a value that cannot be used; the default stands."""


def env_int(name: str, default: int, *, minimum: Optional[int] = None, choices: Optional[tuple] = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        warnings.warn(f"ds4kern: {name}={raw!r} is not an integer; using the default {default}",
                      EnvWarning, stacklevel=2)
        return default
    if (minimum is not None and value < minimum) or (choices is not None and value not in choices):
        want = f"one of {choices}" if choices is not None else f">= {minimum}"
        warnings.warn(f"ds4kern: {name}={raw!r} must be {want}; using the default {default}",
                      EnvWarning, stacklevel=2)
        return default
    return value
