"""router_topk's static rule and token buckets, decided without a GPU."""

import numpy as np

import ds4kern
from ds4kern.ops.router import OP, RouterProblem, bucket_tokens


def test_buckets():
    assert [bucket_tokens(t) for t in (0, 1, 2, 3, 4, 5, 7, 100, 128, 129, 192, 193, 12288, 12289, 65536)] == \
        [0, 1, 2, 3, 4, 6, 8, 128, 128, 192, 192, 256, 12288, 16384, 65536]
    edges = sorted({1 << n for n in range(2, 14)} | {3 << n for n in range(12)})  # 3, 4, 6, 8, 12, ...
    for t in range(3, 5000):  # each bucket: the smallest edge (a power of two or 3/4 of one) >= t
        assert bucket_tokens(t) == next(e for e in edges if e >= t), t
    a = ds4kern.explain("router_topk", np.ones((100, 16), np.float32), 2).problem
    b = ds4kern.explain("router_topk", np.ones((120, 16), np.float32), 2).problem
    assert a == b and a.bucket == b.bucket


def test_router_static_rule_threshold_vs_naive():
    """The measured rule: threshold from 4096 tokens (bucketed) up, naive below, where screened
    cannot run."""
    from ds4kern.ops.router.rule import router_topk_rule

    def p(t):
        return RouterProblem("cuda", t, 1024, 6, "float32", "int32", "sqrtsoftplus", False, True)

    ok = frozenset({"naive", "threshold", "radix"})
    assert router_topk_rule(p(4096), ok)[0] == "threshold"
    assert router_topk_rule(p(65536), ok)[0] == "threshold"
    assert router_topk_rule(p(2048), ok)[0] == "naive"
    assert router_topk_rule(p(1), ok)[0] == "naive"


def test_router_static_rule_between_cuda_variants():
    """The measured rule (bench/router/PERFORMANCE.md): rows above 12288 tokens where it
    applies (group-limited routing included), screened for E <= 512 and k < 32 otherwise, grouped
    for group-limited routing on whole lanes, threshold from 4096 tokens for 512 < E <= 1024,
    naive below that, radix from k = 32 (or k >= 16 above E = 1024) and beyond E = 3072.
    Decided without a GPU."""
    from ds4kern.core import dispatch
    from ds4kern.ops.router import OP, RouterProblem

    def chosen(T, E, k, groups=0, gt=4, dtype="float32", sf="sigmoid"):
        p = RouterProblem("cuda", T, E, k, dtype, "int32", sf, False, True, groups, gt if groups else 0)
        return dispatch.decide(OP, p).chosen.name

    # rows: from the bucket 12289-16384 (sigmoid / sqrtsoftplus, E % 8 == 0, E <= 256, k <= 16)
    assert chosen(65536, 256, 6, dtype="bfloat16", sf="sqrtsoftplus") == "rows"
    assert chosen(32768, 256, 8, dtype="float16") == "rows"
    assert chosen(16384, 256, 6, dtype="bfloat16") == "rows"
    assert chosen(12288, 256, 6, dtype="bfloat16") == "screened"
    assert chosen(65536, 256, 6) == "rows"  # float32 too (measured faster from the fifth session)
    assert chosen(16384, 256, 6) == "rows"
    assert chosen(12288, 256, 6) == "screened"
    assert chosen(65536, 256, 6, dtype="bfloat16", sf="softmax") == "screened"
    assert chosen(65536, 512, 6, dtype="bfloat16") == "screened"
    assert chosen(65536, 256, 24, dtype="bfloat16") == "screened"
    # group-limited: rows' grouped form above 12288 tokens where groups are 16n experts, k <= 8 and
    # k / group_topk <= 2; grouped otherwise
    assert chosen(65536, 256, 8, groups=8, dtype="bfloat16") == "rows"
    assert chosen(32768, 256, 8, groups=8) == "rows"
    assert chosen(16384, 256, 8, groups=8) == "rows"
    assert chosen(12288, 256, 8, groups=8) == "grouped"
    assert chosen(65536, 256, 8, groups=8, gt=2) == "grouped"  # k / group_topk = 4
    assert chosen(65536, 256, 16, groups=8) == "grouped"       # k > 8
    assert chosen(65536, 256, 8, groups=32, gt=8) == "grouped"  # groups of 8 experts
    assert chosen(65536, 256, 8, groups=8, sf="softmax") == "grouped"

    assert chosen(1, 256, 6) == "screened"
    assert chosen(128, 256, 6) == "screened"
    assert chosen(65536, 512, 16) == "screened"
    assert chosen(128, 1024, 8) == "naive"
    assert chosen(4096, 1024, 8) == "threshold"
    assert chosen(4096, 256, 32) == "radix"
    assert chosen(128, 1024, 64) == "radix"
    assert chosen(16384, 3072, 16) == "radix"
    assert chosen(16384, 3072, 8) == "naive"
    assert chosen(16, 8192, 6) == "radix"  # the only kernel there
    assert chosen(4096, 256, 8, groups=8) == "grouped"  # DeepSeek-V3 style
    assert chosen(4096, 256, 32, groups=8) == "grouped"  # radix, threshold and screened decline groups
    assert chosen(4096, 130, 6, groups=13, gt=3) == "naive"  # groups of 10 experts: not whole lanes
    assert chosen(4096, 1024, 32, groups=8) == "naive"  # E > 512
