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


def lr_multipliers(model, scale: dict | None) -> dict[str, float]:
    """``{parameter name: multiplier of train.lr}`` for the trainable parameters that train at ``lr`` (everything
    but the LM's pretrained weights, which keep ``lm_lr``): the value of the longest prefix in ``scale``
    (``train.lr_scale``) that is the name or a dotted ancestor of the parameter, else 1. A prefix that matches no such
    parameter is a ConfigError naming the prefixes that exist."""
    new = {id(p) for p in added_parameters(model.lm)}
    names = [n for n, p in model.named_parameters()
             if p.requires_grad and not (n.startswith("lm.") and "lora_" not in n and id(p) not in new)]
    scale = dict(scale or {})

    def matches(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    unmatched = [k for k in scale if not any(matches(n, k) for n in names)]
    if unmatched:
        tops = sorted({".".join(n.split(".")[:2]) for n in names} | {n.split(".")[0] for n in names})
        lm_only = [k for k in unmatched if any(matches(n, k) for n, p in model.named_parameters() if p.requires_grad)]
        hint = (f" ({', '.join(lm_only)} holds only the LM's pretrained weights, whose rate is train.lm_lr)"
                if lm_only else "")
        raise ConfigError(f"train.lr_scale: prefix(es) {', '.join(unmatched)} match no trainable parameter that "
                          f"trains at train.lr in this stage{hint}; prefixes that exist: "
                          f"{', '.join(tops)} (or any longer dotted module name under them)")
    out = {}
    for n in names:
        best = max((k for k in scale if matches(n, k)), key=len, default=None)
        out[n] = float(scale[best]) if best is not None else 1.0
    return out


def param_groups(model, t: dict) -> list[dict]:
    """AdamW groups for the trainable parameters and ``cfg["train"]`` ``t``: weight decay on matrices only;
    ``train.lm_lr`` for the LM's pretrained weights (full sft), ``lr`` for everything new (projector, token ops,
    policies, experts, LoRA adapters), times the multiplier ``train.lr_scale`` gives its longest matching
    module-name prefix (:func:`lr_multipliers`)."""
    mult = lr_multipliers(model, t.get("lr_scale"))
    groups: dict[tuple[bool, bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            pretrained_lm = name not in mult
            lr = (t["lm_lr"] or t["lr"]) if pretrained_lm else t["lr"] * mult[name]
            groups.setdefault((pretrained_lm, p.ndim >= 2, lr), []).append(p)
    return [{"params": ps, "weight_decay": t["weight_decay"] if decay else 0.0, "lr": lr}
            for (_, decay, lr), ps in sorted(groups.items())]
