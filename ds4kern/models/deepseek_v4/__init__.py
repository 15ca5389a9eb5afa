"""DeepSeek-V4 built from ds4kern ops: configs (Flash, Pro, a small one for tests and CPU runs),
random weights of the real shapes, per-layer KV state, and the attention block (decode).

What the block computes follows the public inference code as written down in
``bench/lab/deepseek_v4_attention_notes.md`` (sources cited there); deviations are listed in
:mod:`.attention`.
"""

from .attention import attention_decode, attention_prefill, window_slots
from .config import Config, flash, pro, small
from .reference import reference_attention_decode
from .state import LayerState
from .weights import AttentionWeights, random_attention_weights

__all__ = ["Config", "flash", "pro", "small", "AttentionWeights", "random_attention_weights", "LayerState",
           "attention_decode", "attention_prefill", "window_slots", "reference_attention_decode"]
