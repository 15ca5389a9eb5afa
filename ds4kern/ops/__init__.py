"""One package per op family (public function, problem and validation, reference, kernels,
variants and their registration, the dispatch rule).  Importing this package imports them all,
which registers their ops, variants and kernel families with the core."""

from . import compressor, expert_mlp, hyper_connections, indexer, moe, norm, router, router_hash, router_te, sparse_attention, topk  # noqa: F401
