"""How a step runs fast, with the semantics of acai_fast.models unchanged: the fused ACAI schedule
(fused_step), CUDA-graph replay of any step (graphs), and a launch counter (launches)."""
from .launches import count_launches

__all__ = ["count_launches"]
