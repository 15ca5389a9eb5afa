"""MoE token dispatch and combine on one GPU: moe_permute (a stable sort of the router's entries
by expert, and the tokens' rows copied into that order) and moe_unpermute (the weighted sum of
the experts' rows back per token)."""

from ...core.registry import add_builtin
from . import variants
from .api import (PERMUTE_OP, UNPERMUTE_OP, MoePermutation, MoePermuteArgs, MoePermuteProblem, MoeUnpermuteArgs,
                  MoeUnpermuteProblem, moe_permute, moe_unpermute)
from .reference import reference_permutation, reference_permute_rows, reference_unpermute

add_builtin(variants)

__all__ = ["moe_permute", "moe_unpermute", "MoePermutation", "MoePermuteArgs", "MoePermuteProblem",
           "MoeUnpermuteArgs", "MoeUnpermuteProblem", "PERMUTE_OP", "UNPERMUTE_OP", "reference_permutation",
           "reference_permute_rows", "reference_unpermute"]
