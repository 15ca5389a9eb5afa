"""One module per op family: validation, the public function, its variants' registration."""

from . import compressor, router, router_te

# op name -> (public function, explain function taking the same arguments)
OPS = {
    router.OP: (router.router_topk, router.explain_router_topk),
    router.HASH_OP: (router.router_hash, router.explain_router_hash),
    router_te.DENSE_OP: (router_te.router_topk_dense, router_te.explain_dense),
    router_te.BACKWARD_OP: (router_te.router_topk_backward, router_te.explain_backward),
    router_te.AUX_SCORES_OP: (router_te.router_aux_scores, router_te.explain_aux_scores),
    router_te.AUX_SCORES_BACKWARD_OP: (router_te.router_aux_scores_backward, router_te.explain_aux_scores_backward),
    router_te.AUX_LOSS_OP: (router_te.router_aux_loss, router_te.explain_aux_loss),
    router_te.AUX_LOSS_BACKWARD_OP: (router_te.router_aux_loss_backward, router_te.explain_aux_loss_backward),
    compressor.DECODE_OP: (compressor.compress_decode, compressor.explain_decode),
    compressor.PREFILL_OP: (compressor.compress_prefill, compressor.explain_prefill),
}
