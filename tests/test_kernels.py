"""Kernel sources: location, header folding and #line marks, and the NVRTC compile check."""

import re

import pytest

from ds4kern import kernels


def test_every_source_found_and_declared():
    import ds4kern.ops  # noqa: F401

    names = {p.name for p in kernels.list_sources()}
    assert "router.cu" in names
    assert set(kernels.FAMILIES) == names, "every .cu needs a KernelFamily and vice versa"


def test_headers_folded_with_line_marks():
    code = kernels.load_source("router.cu")
    assert code.startswith('#line 1 "cuda_src/router.cu"')
    assert '#line 1 "cuda_src/common.cuh"' in code
    assert "ds4_order_key" in code  # the header's text is in the source CuPy hashes
    assert '#include "common.cuh"' not in code
    # after the header, line numbers resume at the line following the include
    src = (kernels.source_dir() / "router.cu").read_text().splitlines()
    inc_line = next(i for i, l in enumerate(src, 1) if '#include "common.cuh"' in l)
    assert f'#line {inc_line + 1} "cuda_src/router.cu"' in code


def test_fold_once_and_recursion(tmp_path, monkeypatch):
    (tmp_path / "a.cuh").write_text('#include "b.cuh"\nint a;\n')
    (tmp_path / "b.cuh").write_text("int b;\n")
    (tmp_path / "x.cu").write_text('#include "a.cuh"\n\n#include "b.cuh"\n#include "a.cuh"\n#include <cuda_fp16.h>\nint x;\n')
    code = kernels._fold(tmp_path / "x.cu", ("x.cu",), set())
    assert code.count("int b;") == 1 and code.count("int a;") == 1 and "#include <cuda_fp16.h>" in code
    # every #line directive starts its own line
    assert all(line.startswith("#line") for line in code.splitlines() if "#line" in line)
    (tmp_path / "c.cuh").write_text('#include "c.cuh"\n')
    with pytest.raises(ValueError, match="recursive"):
        kernels._fold(tmp_path / "c.cuh", ("c.cuh",), set())


def test_undeclared_instantiation_refused():
    import ds4kern.ops.router as r

    with pytest.raises(KeyError, match="not a declared instantiation"):
        kernels.get_kernel(r.ROUTER_KERNELS, "router_topk_naive<double, int, 8>")


def test_nvrtc_compile_check_every_kernel():
    """Compiles every source and name expression for sm_80 and sm_90 with NVRTC (no GPU)."""
    from ds4kern import compile_check as cc

    try:
        cc.NVRTC()
    except cc.NVRTCError as e:
        pytest.fail(f"NVRTC is part of the test extra and must be present: {e}")
    results = cc.check_all(cc.DEFAULT_ARCHS)
    done = {(r.source, r.arch) for r in results}
    for fam in kernels.FAMILIES.values():
        for arch in cc.DEFAULT_ARCHS:
            assert (fam.source, arch) in done
    for r in results:
        fam = kernels.FAMILIES[r.source]
        assert r.n_kernels == len(fam.name_expressions) and r.cubin_bytes > 0
        assert not r.spills, f"{r.source} {r.arch} spills registers: {r.spills[:3]}"


def test_compile_check_reports_errors_with_file_and_line(tmp_path):
    from ds4kern import compile_check as cc

    nv = cc.NVRTC()
    # an error after a folded two-line header still names the source file and its own line 4
    (tmp_path / "h.cuh").write_text("#pragma once\n__device__ int h() { return 1; }\n")
    (tmp_path / "broken.cu").write_text('// a\n#include "h.cuh"\n__global__ void f() {\n  undefined_thing();\n}\n')
    code = kernels._fold(tmp_path / "broken.cu", ("broken.cu",), set())
    with pytest.raises(cc.NVRTCError, match=re.escape("cuda_src/broken.cu(4)")):
        nv.compile(code, "broken.cu", ["-arch=sm_90"], [])
