"""Which parameters train, and how: the stages (``align``: projector; ``sft``: also the LM, fully or with LoRA),
LoRA adapters (peft, injected in place and merged back on export), and the optimizer's parameter groups."""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..experts import added_parameters


def add_lora(lm: nn.Module, spec: dict) -> None:
    """Inject LoRA adapters (peft) into ``lm`` in place. ``spec``: r, alpha, dropout, target_modules, layers."""
    try:
        from peft import LoraConfig, inject_adapter_in_model  # optional [train] extra, only when a recipe asks for LoRA
    except ImportError:
        raise ConfigError("train.lora needs peft: pip install 'compactvl[train]' (or pip install peft)") from None
    known = {"r", "alpha", "dropout", "target_modules", "layers"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"train.lora has unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    layers = spec.get("layers")
    cfg = LoraConfig(r=int(spec.get("r", 8)), lora_alpha=float(spec.get("alpha", 16)),
                     lora_dropout=float(spec.get("dropout", 0.0)),
                     target_modules=list(spec.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])),
                     layers_to_transform=list(layers) if layers is not None else None,
                     layers_pattern="layers" if layers is not None else None)
    try:
        inject_adapter_in_model(cfg, lm)
    except ValueError as e:
        raise ConfigError(f"cannot add LoRA with {spec}: {e}; check target_modules names the LM's linear "
                          "layers (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)") from None


def merge_lora(module: nn.Module) -> int:
    """Merge every LoRA adapter into its base layer and put the plain layer back; returns how many were merged."""
    try:
        from peft.tuners.lora import LoraLayer  # optional [train] extra: without peft there are no adapters to merge
    except ImportError:
        return 0
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]
    for name, m in targets:
        m.merge()
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, m.get_base_layer())
    return len(targets)


def configure_trainable(model, stage: str, lora: dict | None = None, train_encoders: bool = False) -> list[str]:
    """Set requires_grad for a stage; returns the names of the trainable parameters. Both stages train the projector,
    learnable token ops and policies (e.g. SIP's head), and what expert surgery added to the LM (routers, experts —
    not the pretrained FFNs)."""
    if stage not in ("align", "sft"):
        raise ConfigError(f"unknown stage {stage!r}; use align (projector only) or sft (projector + LM)")
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.token_ops.requires_grad_(True)
    if isinstance(getattr(model, "policies", None), nn.Module):
        model.policies.requires_grad_(True)
    if stage == "sft":
        if lora:
            add_lora(model.lm, lora)
            for name, p in model.lm.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            model.lm.requires_grad_(True)
    for p in added_parameters(model.lm):
        p.requires_grad_(True)
    if train_encoders:
        if not model.config.train_encoders:
            raise ConfigError("train.train_encoders needs a model built with train_encoders=True (build_model does "
                              "this from the recipe)")
        model.encoders.requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ConfigError(f"stage {stage} leaves nothing to train; check the projector has parameters")
    return names


def param_groups(model, t: dict) -> list[dict]:
    """AdamW groups for the trainable parameters and ``cfg["train"]`` ``t``: weight decay on matrices only;
    ``train.lm_lr`` for the LM's pretrained weights (full sft), ``lr`` for everything new (projector, token ops,
    policies, experts, LoRA adapters)."""
    new = {id(p) for p in added_parameters(model.lm)}
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            pretrained_lm = name.startswith("lm.") and "lora_" not in name and id(p) not in new
            groups.setdefault((pretrained_lm, p.ndim >= 2), []).append(p)
    return [{"params": ps, "weight_decay": t["weight_decay"] if decay else 0.0,
             "lr": (t["lm_lr"] or t["lr"]) if lm else t["lr"]} for (lm, decay), ps in sorted(groups.items())]
