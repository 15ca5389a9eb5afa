"""Manifold-constrained hyper-connections (DeepSeek-V4): hc_pre, hc_post and hc_post_pre."""

from ...core.registry import add_builtin
from . import variants
from .api import POST_OP, POST_PRE_OP, PRE_OP, HcArgs, HcProblem, hc_post, hc_post_pre, hc_pre
from .reference import reference_hc_post, reference_hc_pre, reference_mix

add_builtin(variants)

__all__ = ["hc_pre", "hc_post", "hc_post_pre", "HcArgs", "HcProblem", "PRE_OP", "POST_OP", "POST_PRE_OP",
           "reference_hc_pre", "reference_hc_post", "reference_mix"]
