"""Expert locality: the offline analysis of routing captures (``analysis``) and the online
recorder on the GPU (``recorder``, kernels in ``cuda_src/locality/``)."""

from .analysis import *  # noqa: F401,F403
from .analysis import __all__ as _analysis_all

__all__ = list(_analysis_all)
