"""Kernel sources as they were before ``cuda_src/`` was split into one folder per op family
(commit 78d3901), read from git history, with their launch helpers of that commit.

The shipped kernels no longer have the experiment branches (``-DDS4_ROWS_DEBUG``,
``-DDS4_ROWS_PD=...``, ``-DDS4_SSP_POLY=6``, ...) that the lab benches build; the pre-split
sources still do, and their default builds are byte-identical to the shipped kernels (same
``.text`` per kernel, sm_90 and sm_80), so a lab build stands next to the library's.  Nothing of
the old text is kept in the working tree: it comes from ``git show`` (the benches need a git
checkout with that commit).

    from old_source import old_source, rows_name, rows_smem
    code = old_source("router_rows.cu")   # headers folded from the same commit
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

COMMIT = "78d3901"
ROOT = Path(__file__).resolve().parents[2]
OPTIONS = ("-std=c++17",)  # what the library compiled every kernel with at that commit

_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def _exists(path: str, commit: str) -> bool:
    return _git("cat-file", "-e", f"{commit}:{path}").returncode == 0


def _show(path: str, commit: str) -> str:
    r = _git("show", f"{commit}:{path}")
    if r.returncode != 0:
        raise FileNotFoundError(f"{path} at {commit}: {r.stderr.strip()} (a git checkout with that commit is needed)")
    return r.stdout


def fold(text: str, path: str, commit: str = COMMIT, done: set | None = None) -> str:
    """``text`` (the source at ``path``, e.g. ``cuda_src/router_rows.cu``) with its quoted project
    headers inlined from ``commit``, each once, resolved next to the including file, with ``#line``
    marks (as the library's loader of that commit did)."""
    done = set() if done is None else done
    parts = [f'#line 1 "{path}"\n']
    pos = 0
    for m in _INCLUDE_RE.finditer(text):
        header = (Path(path).parent / m.group(1)).as_posix()
        if not _exists(header, commit):
            continue  # not a project header: NVRTC resolves it
        parts.append(text[pos:m.start()])
        if header not in done:
            done.add(header)
            parts.append(fold(_show(header, commit), header, commit, done))
        parts.append(f'\n#line {text.count(chr(10), 0, m.start()) + 2} "{path}"')
        pos = m.end()
    parts.append(text[pos:])
    return "".join(parts)


@functools.lru_cache(maxsize=None)
def old_source(name: str, commit: str = COMMIT) -> str:
    """``cuda_src/<name>`` at ``commit`` (default: the last commit before the split), headers folded."""
    path = f"cuda_src/{name}"
    return fold(_show(path, commit), path, commit)


# Launch helpers of the rows kernels at that commit (ds4kern/ops/router.py there).
CTYPE = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
ROWS_SF = {"sigmoid": 1, "sqrtsoftplus": 2}
ROWS_WARPS = 2  # DS4_ROWS_WARPS without a -D


def rows_name(dtype: str, sf: int, kmax: int, lpt: int = 1) -> str:
    return f"router_topk_rows<{CTYPE[dtype]}, {sf}, {kmax}, {lpt}>"


def rows_grouped_name(dtype: str, sf: int) -> str:
    return f"router_topk_rows_grouped<{CTYPE[dtype]}, {sf}>"


def rows_smem(kmax: int, warps: int = ROWS_WARPS, grouped: bool = False) -> int:
    """Dynamic shared memory of one block of ``warps`` warps: candidate lists (logit and expert;
    grouped: 8 more rows), bias table, max |bias|."""
    return warps * (kmax + (24 if grouped else 16)) * 32 * 5 + (256 + 4) * 4
