"""Router in TransformerEngine's dense form (forward, backward) and the aux-loss ops."""

from ...core.registry import add_builtin
from . import variants
from .api import BACKWARD_OP, DENSE_OP, router_topk_backward, router_topk_dense
from .aux import (AUX_LOSS_BACKWARD_OP, AUX_LOSS_OP, AUX_SCORES_BACKWARD_OP, AUX_SCORES_OP, router_aux_loss,
                  router_aux_loss_backward, router_aux_scores, router_aux_scores_backward)
from .reference import pack_bitmap, unpack_bitmap

add_builtin(variants)

__all__ = ["router_topk_dense", "router_topk_backward", "router_aux_scores", "router_aux_scores_backward",
           "router_aux_loss", "router_aux_loss_backward", "pack_bitmap", "unpack_bitmap"]
