"""On-Policy Self-Distillation: the algorithm (``algorithm.py``), its objective (``divergence.py``),
the fused loss that computes it from hidden states (``loss.py``, ``chunks.py``), where the
teacher's weights come from (``teacher.py``) and the loss's diagnostics (``diagnostics.py``)."""
from megatron_opsd.algorithms.opsd.algorithm import OPSD, OPSDConfig

__all__ = ["OPSD", "OPSDConfig"]
