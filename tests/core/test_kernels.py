"""Kernel sources: location, header folding and #line marks, and the NVRTC compile check."""

import re

import pytest

import ds4kern  # noqa: F401  (its ops register their kernel families)
from ds4kern.core import compile_check as cc
from ds4kern.core import kernels

FAMILIES = sorted(kernels.FAMILIES)


def test_every_source_found_and_declared():
    names = set(kernels.list_sources())
    assert "router/naive.cu" in names
    assert set(kernels.FAMILIES) == names, "every .cu needs a KernelFamily and vice versa"
    for rel in names:  # one folder per op family, each source well under 600 lines
        assert "/" in rel, f"{rel}: sources live in cuda_src/<op>/"
        assert len((kernels.source_dir() / rel).read_text().splitlines()) < 600, rel


def test_headers_folded_with_line_marks():
    code = kernels.load_source("router/naive.cu")
    assert code.startswith('#line 1 "cuda_src/router/naive.cu"')
    assert '#line 1 "cuda_src/common/common.cuh"' in code
    assert "ds4_order_key" in code  # the header's text is in the source CuPy hashes
    assert "#include \"../common/common.cuh\"" not in code
    # after a header, line numbers resume at the line following the include
    src = (kernels.source_dir() / "router/naive.cu").read_text().splitlines()
    inc_line = max(i for i, l in enumerate(src, 1) if l.strip().startswith('#include "'))
    assert f'#line {inc_line + 1} "cuda_src/router/naive.cu"' in code


def test_no_experiment_knobs_in_shipped_kernels():
    """Experiments live in bench/lab: no #ifdef / #ifndef of a DS4_ macro that only a benchmark
    would set, in any shipped source or header."""
    pat = re.compile(r"^\s*#\s*(ifdef|ifndef|if\s+defined)\s*\(?\s*(DS4_\w+)", re.MULTILINE)
    for path in kernels.source_dir().rglob("*.cu*"):
        hits = [m.group(2) for m in pat.finditer(path.read_text()) if not m.group(2).endswith("_CUH")]
        assert not hits, f"{path.name}: experiment switches {hits}"


def test_fold_once_and_recursion(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.cuh").write_text('#include "../b.cuh"\nint a;\n')
    (tmp_path / "b.cuh").write_text("int b;\n")
    (tmp_path / "x.cu").write_text('#include "sub/a.cuh"\n\n#include "b.cuh"\n#include "sub/a.cuh"\n'
                                   '#include <cuda_fp16.h>\nint x;\n')
    code = kernels._fold(tmp_path / "x.cu", tmp_path, ("x.cu",), set())
    assert '#line 1 "cuda_src/sub/a.cuh"' in code
    assert code.count("int b;") == 1 and code.count("int a;") == 1 and "#include <cuda_fp16.h>" in code
    # every #line directive starts its own line
    assert all(line.startswith("#line") for line in code.splitlines() if "#line" in line)
    (tmp_path / "c.cuh").write_text('#include "c.cuh"\n')
    with pytest.raises(ValueError, match="recursive"):
        kernels._fold(tmp_path / "c.cuh", tmp_path, ((tmp_path / "c.cuh").resolve().as_posix(),), set())


def test_undeclared_instantiation_refused():
    from ds4kern.ops.router import kernels as rk

    with pytest.raises(KeyError, match="not a declared instantiation"):
        kernels.get_kernel(rk.NAIVE, "router_topk_naive<double, int, 8>")


# where passing compile results are kept, resolved at collection (before the autouse fixture
# points DS4KERN_CACHE_DIR at a temporary folder); set DS4KERN_CACHE_DIR to an empty folder to
# compile everything
COMPILE_CACHE = cc.cache_dir()


@pytest.fixture(scope="module")
def compiled(request):
    """Every selected (source, arch) of ``test_nvrtc_compile_check``, compiled at once on all cores
    (unchanged sources that passed before come from the cache): ``{(source, arch): result or error}``."""
    try:
        cc.NVRTC()
    except cc.NVRTCError as e:
        pytest.fail(f"NVRTC is part of the test extra and must be present: {e}")
    wanted = sorted({(it.callspec.params["source"], it.callspec.params["arch"]) for it in request.session.items
                     if getattr(it, "originalname", "") == "test_nvrtc_compile_check"})
    return cc.compile_jobs([(kernels.FAMILIES[src], arch) for src, arch in wanted], cache=COMPILE_CACHE)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", FAMILIES)
def test_nvrtc_compile_check(compiled, source, arch):
    """One source with all its name expressions compiles for one architecture with NVRTC (no GPU)."""
    r = compiled[(source, arch)]
    if isinstance(r, Exception):
        pytest.fail(str(r), pytrace=False)
    fam = kernels.FAMILIES[source]
    assert r.n_kernels == len(fam.name_expressions) and r.cubin_bytes > 0
    assert not r.spills, f"{r.source} {r.arch} spills registers: {r.spills[:3]}"


def test_compile_cache_reuses_passing_results_only(tmp_path, monkeypatch):
    """A passing result is kept and served again; a changed source is compiled anew; a failure is
    not kept."""
    src = tmp_path / "src"
    (src / "t").mkdir(parents=True)
    (src / "t" / "k.cu").write_text("template <int N> __global__ void k(int* p) { p[0] = N; }\n")
    monkeypatch.setattr(kernels, "source_dir", lambda: src)
    kernels.load_source.cache_clear()
    fam = kernels.KernelFamily("t/k.cu", ("k<1>", "k<2>"))
    cache = tmp_path / "cache"
    try:
        first = cc.compile_jobs([(fam, "sm_80")], cache=cache)[("t/k.cu", "sm_80")]
        again = cc.compile_jobs([(fam, "sm_80")], cache=cache)[("t/k.cu", "sm_80")]
        assert not first.cached and again.cached and again.n_kernels == 2 and again.spills == first.spills
        (src / "t" / "k.cu").write_text("template <int N> __global__ void k(int* p) { p[1] = N; }\n")
        kernels.load_source.cache_clear()
        changed = cc.compile_jobs([(fam, "sm_80")], cache=cache)[("t/k.cu", "sm_80")]
        assert not changed.cached and len(list(cache.glob("*.json"))) == 1  # the stale entry went
        (src / "t" / "k.cu").write_text("__global__ void k(int* p) { undefined(); }\n")
        kernels.load_source.cache_clear()
        for _ in range(2):
            bad = cc.compile_jobs([(kernels.KernelFamily("t/k.cu", ()), "sm_90")], cache=cache)[("t/k.cu", "sm_90")]
            assert isinstance(bad, cc.NVRTCError) and "t/k.cu for sm_90" in str(bad)
    finally:
        kernels.load_source.cache_clear()


def test_compile_check_reports_errors_with_file_and_line(tmp_path):
    nv = cc.NVRTC()
    # an error after a folded two-line header still names the source file and its own line 4
    (tmp_path / "h.cuh").write_text("#pragma once\n__device__ int h() { return 1; }\n")
    (tmp_path / "broken.cu").write_text('// a\n#include "h.cuh"\n__global__ void f() {\n  undefined_thing();\n}\n')
    code = kernels._fold(tmp_path / "broken.cu", tmp_path, ("broken.cu",), set())
    with pytest.raises(cc.NVRTCError, match=re.escape("cuda_src/broken.cu(4)")):
        nv.compile(code, "broken.cu", ["-arch=sm_90"], [])
