"""Expert surgeries on the LM (registered in ``compactvl.registry.EXPERTS``; a recipe names them under
``experts: [{expert: hte, ...}]``): each replaces the ``mlp`` of chosen decoder layers in place.

* ``hte`` — VEN-VL's Hierarchical Token Ensemble MoE FFN (pretrained FFN as global expert + routed visual experts).
* ``mmoe`` — LEO-MINI's MMoE-LLM (LoRA experts on the MLP linears + general expert, multi-modal router).
* ``native_moe`` — no surgery: reads an existing MoE LM's router for training-free HTE pruning (``hte_native``).
* ``smoes`` — no surgery: SMoES's expert binning + inter-bin MI regulariser on MoE / hte routers (policy ``smoes``).

See docs/experts.md.
"""
from . import hte, mmoe, moe, native_moe, smoes  # noqa: F401  (registers the surgeries and the smoes policy)
from .hte import HTEMoE, SwiGLUExpert, apply_hte, hte_layers
from .mmoe import LoRABank, MMoEMLP, apply_mmoe
from .moe import (ExpertModule, Groups, added_parameters, balance_loss, check_swiglu, dispatch, expert_modules,
                  extra_macs, group, resolve_layers, route)
from .native_moe import RouterTap, moe_layers

__all__ = [
    "HTEMoE", "SwiGLUExpert", "apply_hte", "extra_macs", "hte_layers", "LoRABank", "MMoEMLP", "apply_mmoe",
    "ExpertModule", "Groups", "added_parameters", "balance_loss", "check_swiglu", "dispatch", "expert_modules", "group",
    "resolve_layers", "route", "RouterTap", "moe_layers",
]
