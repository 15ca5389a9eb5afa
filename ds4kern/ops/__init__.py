"""One module per op family: validation, the public function, its variants' registration."""

from . import router

# op name -> (public function, explain function taking the same arguments)
OPS = {
    router.OP: (router.router_topk, router.explain_router_topk),
    router.HASH_OP: (router.router_hash, router.explain_router_hash),
}
