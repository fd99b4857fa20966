"""Auxiliary training losses: FSQ (finite scalar quantization, the SIP target) and SIP (VEN-VL's structure
information preservation, a LayerPolicy registered as ``sip``). MoE load balancing lives with the experts
(``compactvl.experts.moe.balance_loss``)."""
from .fsq import FSQ, round_ste
from .sip import SIP, propagate, sinusoidal_2d

__all__ = ["FSQ", "round_ste", "SIP", "propagate", "sinusoidal_2d"]
