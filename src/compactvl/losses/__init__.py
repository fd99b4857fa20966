"""Training losses, as tensor math: the next-token loss under row dropping (``next_token``), FSQ (finite scalar quantization, the SIP target) and SIP (VEN-VL's
structure information preservation: propagation, reconstruction, the loss; the layer policy that applies it, ``sip``,
is ``compactvl.policies.sip.SIP``). MoE load balancing lives with the experts (``compactvl.experts.moe.balance_loss``).
"""
from .fsq import FSQ, round_ste
from .next_token import next_token_loss, next_token_targets
from .sip import propagate, reconstruct_slots, row_major_positions, sinusoidal_2d, sip_loss, visual_slots

__all__ = ["FSQ", "round_ste", "next_token_loss", "next_token_targets", "propagate", "reconstruct_slots", "row_major_positions", "sinusoidal_2d", "sip_loss",
           "visual_slots"]
