"""Kernel sources and their compiled modules.

Each op family has its folder ``cuda_src/<op>/`` (shipped inside the wheel as
``ds4kern/cuda_src``); shared device helpers sit in ``cuda_src/common/``.  A
:class:`KernelFamily` names one source (``"router/rows.cu"``) and every template instantiation
(NVRTC name expression) it may need; an op asks for one instantiation and gets a
``cupy.RawKernel``, compiled once per device and specialisation.

Project headers included with ``#include "x.cuh"`` (resolved relative to the including file, as
a C compiler does) are folded into the source text before it reaches NVRTC, so that CuPy's
on-disk cache key (the source text) changes whenever a header does.  A ``#line`` directive in
front of each folded piece makes compiler errors name the real file.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "KernelFamily",
    "FAMILIES",
    "source_dir",
    "list_sources",
    "load_source",
    "get_kernel",
    "COMMON_OPTIONS",
]

# Options every kernel is compiled with.  No fast math: the router's scores must match the
# float32 reference to a few ulp.  CuPy appends -ftz=true to every compile (the last -ftz option
# wins, so it cannot be undone here): subnormal floats flush to zero in arithmetic and
# comparisons; see compile_check.CUPY_APPENDED.
COMMON_OPTIONS: tuple[str, ...] = ("-std=c++17",)

_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)


def source_dir() -> Path:
    """Folder holding the ``.cu``/``.cuh`` sources.

    Installed from a wheel they sit in ``ds4kern/cuda_src``; in a source checkout (editable
    install or plain ``PYTHONPATH``) they sit in ``cuda_src/`` beside the package.
    """
    pkg = Path(__file__).resolve().parent.parent
    for cand in (pkg / "cuda_src", pkg.parent / "cuda_src"):
        if cand.is_dir() and any(cand.rglob("*.cu")):
            return cand
    raise FileNotFoundError(
        f"ds4kern: kernel sources not found (looked in {pkg / 'cuda_src'} and "
        f"{pkg.parent / 'cuda_src'}); the installation is incomplete"
    )


def list_sources() -> list[Path]:
    """Every kernel source (``.cu``) that ships with the package, as paths relative to the
    source folder (``router/rows.cu``), sorted."""
    d = source_dir()
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*.cu"))


def _fold(path: Path, root: Path, stack: tuple[str, ...], done: set[str]) -> str:
    """Inline every project header (once per source, like ``#pragma once``)."""
    text = path.read_text()
    rel = f"cuda_src/{path.relative_to(root).as_posix()}"
    parts = [f'#line 1 "{rel}"\n']
    pos = 0
    for m in _INCLUDE_RE.finditer(text):
        header = (path.parent / m.group(1)).resolve()
        if not header.is_file():
            continue  # not a project header: the compiler resolves it
        key = header.as_posix()
        if key in stack:
            raise ValueError(f"ds4kern: recursive #include of {m.group(1)!r} in {rel}")
        parts.append(text[pos:m.start()])
        if key not in done:
            done.add(key)
            parts.append(_fold(header, root, stack + (key,), done))
        include_line = text.count("\n", 0, m.start()) + 1
        parts.append(f'\n#line {include_line + 1} "{rel}"')
        pos = m.end()
    parts.append(text[pos:])
    return "".join(parts)


@functools.lru_cache(maxsize=None)
def load_source(name: str) -> str:
    """Source text of ``cuda_src/<name>`` (e.g. ``router/rows.cu``) with project headers folded
    in and ``#line`` marks."""
    d = source_dir().resolve()
    path = (d / name).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"ds4kern: no kernel source {name!r} in {d}")
    return _fold(path, d, (path.as_posix(),), set())


@dataclass(frozen=True)
class KernelFamily:
    """One ``.cu`` file (path under ``cuda_src/``) and the template instantiations an op may ask for.

    ``name_expressions`` lists every instantiation: the compile check builds all of them on the
    CPU, and :func:`get_kernel` refuses names outside the list (a typo would otherwise surface
    only on a GPU).
    """

    source: str
    name_expressions: tuple[str, ...]
    options: tuple[str, ...] = field(default=COMMON_OPTIONS)

    def kernel(self, name_expression: str):
        return get_kernel(self, name_expression)


FAMILIES: dict[str, KernelFamily] = {}


def register_family(family: KernelFamily) -> KernelFamily:
    """Record a family so that the compile check and ``info`` see it."""
    FAMILIES[family.source] = family
    return family


_lock = threading.Lock()
_kernels: dict[tuple, object] = {}


def get_kernel(family: KernelFamily, name_expression: str):
    """The ``cupy.RawKernel`` for one instantiation on the current device.

    One ``RawModule`` is built per (device, source text, options, instantiation) and kept for the
    life of the process; CuPy keeps the compiled binary on disk as well.
    """
    if name_expression not in family.name_expressions:
        raise KeyError(
            f"ds4kern: {name_expression!r} is not a declared instantiation of {family.source}"
        )
    import cupy

    dev = cupy.cuda.runtime.getDevice()
    key = (dev, family.source, family.options, name_expression)
    fn = _kernels.get(key)
    if fn is None:
        with _lock:
            fn = _kernels.get(key)
            if fn is None:
                mod = cupy.RawModule(
                    code=load_source(family.source),
                    options=family.options,
                    name_expressions=[name_expression],
                )
                fn = mod.get_function(name_expression)
                _kernels[key] = fn
    return fn


# C++ type of each float dtype name in the kernels' templates
C_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}


def source_define(source: str, name: str) -> str:
    """The value of ``#define NAME value`` in a folded source (tests check Python mirrors of
    CUDA constants with it)."""
    pat = re.compile(rf"^[ \t]*#[ \t]*define[ \t]+{re.escape(name)}[ \t]+([^\n/]+)", re.MULTILINE)
    m = pat.search(load_source(source))
    if m is None:
        raise KeyError(f"ds4kern: no #define {name} in {source}")
    return m.group(1).strip()
