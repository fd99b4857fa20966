"""The packaged system recipes (VEN-VL, LEO-MINI, LLaVA-STF and their ablations): each loads, builds with tiny random
parts substituted for the pretrained ones, has the token count and modules its comment claims, and trains: a few
optimizer steps on a fixed synthvqa batch lower the loss, with the auxiliary losses (MoE balance, SIP) present."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import compactvl.policies.hte  # noqa: F401  (registers hte)
from compactvl.config import ModelSection, list_recipes, load_config, read_yaml, recipe_path
from compactvl.data import SynthVQA
from compactvl.encoders.tiny import tiny_encoder
from compactvl.errors import ConfigError
from compactvl.experts import HTEMoE, MMoEMLP, added_parameters, expert_modules
from compactvl.model import CompactVLM
from compactvl.policies import SIP
from compactvl.policies.hte import HTEPruning
from compactvl.testing import tiny_lm, tiny_tokenizer
from compactvl.train import collate, configure_trainable

SYSTEMS = [r for r in list_recipes() if r.startswith(("venvl", "leomini", "llava_stf"))]
LAYERS = 4
# visual tokens entering the LM: both encoders give 8x8 grids (real parts at 112 / 128 px, tiny parts at 64 px)
TOKENS = {"venvl_mke_no_merge": 128, "venvl_self_merge": 16, "llava_stf_mbtf_only": 64}
TOKENS.update({r: 21 for r in SYSTEMS if r.startswith("venvl") and r not in TOKENS})
TOKENS.update({r: 16 for r in SYSTEMS if r not in TOKENS})


def load(name: str) -> dict:
    if "experts" in ModelSection.__dataclass_fields__:
        return load_config(name)
    raw = read_yaml(recipe_path(name))  # until compactvl.config knows model.experts: validate the rest
    experts = raw.get("model", {}).pop("experts", [])
    cfg = load_config(raw)
    cfg["model"]["experts"] = experts
    return cfg


def tiny_op(spec: dict) -> dict:
    """The tiny encoders have 3 blocks: MBTF fuses all of them instead of every third of 12."""
    if spec["op"] == "mbtf":
        return {**spec, "count": min(spec.get("count", 8), 3), "every": 1}
    return spec


def tiny_system(cfg: dict, lm=None) -> CompactVLM:
    m = cfg["model"]
    names = [e["name"] if isinstance(e, dict) else e for e in m["encoders"]]
    encoders = [tiny_encoder("efficientnet" if "efficientnet" in n else "dinov2", 64, seed=i)
                for i, n in enumerate(names)]
    return CompactVLM.build(lm=lm if lm is not None else tiny_lm(num_hidden_layers=LAYERS), encoders=encoders,
                            tokenizer=tiny_tokenizer(), token_ops=[tiny_op(o) for o in m["token_ops"]],
                            projector=m["projector"], policies=m["policies"], experts=m["experts"],
                            position_policy=m["position_policy"], system_prompt=m["system_prompt"], seed=0)


def trainable(model: CompactVLM, stage: str) -> list[torch.nn.Parameter]:
    """What a recipe trains: the stage's parameters, the expert modules' added parameters and learnable policies."""
    configure_trainable(model, stage)
    params = [p for p in model.parameters() if p.requires_grad]
    extra = added_parameters(model.lm) + [p for pol in model.runner.policies for p in pol.parameters()]
    for p in extra:
        p.requires_grad_(True)
    return params + [p for p in extra if all(p is not q for q in params)]


def test_every_system_of_the_issue_has_a_recipe():
    for name in ["venvl", "venvl_no_sip", "venvl_sip_mse", "venvl_hte_first_half", "venvl_hte_dense",
                 "venvl_hte_sparse", "venvl_hte_sum", "venvl_mke_no_merge", "venvl_self_merge", "venvl_mke_only",
                 "leomini", "leomini_lora_moe", "leomini_resampler", "llava_stf", "llava_stf_avgpool",
                 "llava_stf_token_concat", "llava_stf_mbtf_only"]:
        assert name in SYSTEMS


@pytest.mark.parametrize("name", SYSTEMS)
def test_recipe_builds_and_trains_a_few_steps(name):
    cfg = load(name)
    assert cfg["data"]["train"][0]["name"] == "synthvqa"
    torch.manual_seed(0)
    model = tiny_system(cfg)
    hte = [i for i, layer in enumerate(model.lm.model.layers) if isinstance(layer.mlp, HTEMoE)]
    mmoe = [i for i, layer in enumerate(model.lm.model.layers) if isinstance(layer.mlp, MMoEMLP)]
    sip = [p for p in model.runner.policies if isinstance(p, SIP)]
    pruner = [p for p in model.runner.policies if isinstance(p, HTEPruning)]
    if name.startswith("venvl"):
        placement = {"venvl_hte_first_half": [0, 1], "venvl_hte_dense": [0, 1, 2, 3], "venvl_hte_sparse": [1, 3],
                     "venvl_mke_only": []}
        assert hte == placement.get(name, [2, 3])
        assert bool(sip) == (name not in ("venvl_no_sip", "venvl_mke_only"))
        assert bool(pruner) == (name != "venvl_mke_only")
        if sip:
            assert sip[0].target == ("mse" if name == "venvl_sip_mse" else "fsq")
        if pruner:
            assert pruner[0].saliency == ("sum" if name == "venvl_hte_sum" else "max")
    if name.startswith("leomini"):
        assert mmoe == [0, 1, 2, 3]
        assert all(m.multimodal == (name != "leomini_lora_moe") for _, m in expert_modules(model.lm))
    data = SynthVQA("train", size=4)
    b = collate([data[i] for i in range(4)])
    params = trainable(model, cfg["train"]["stage"])
    opt = torch.optim.Adam(params, lr=3e-3)
    model.train()
    model.encoders.train(False)
    losses, added = [], added_parameters(model.lm)
    for step in range(4):
        x = model.prepare(b.conversations, b.images, with_labels=True)
        assert x.visual_counts == [[TOKENS[name]]] * 4
        out = model(x, return_logits=False)  # the trainer's loss: CE over answer tokens + auxiliary losses
        loss, aux = out.loss, out.aux_loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            out = model.runner.prefill(x.inputs_embeds, x.attention_mask, x.visual_mask, use_cache=False)
            n_aux = len(out.state.signals.aux_losses)
            smoes = len(hte) if any(p["policy"] == "smoes" for p in cfg["model"]["policies"]) else 0
            # one balance loss per MoE layer, one SIP loss, one SMoES MI term per regularised router
            assert n_aux == len(hte) + len(mmoe) + len(sip) + smoes
            assert (aux is not None) == bool(n_aux)
            assert all(p.grad is not None for p in added)
            assert not added or any(p.grad.abs().sum() > 0 for p in added)  # the experts learn from step one
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    if pruner:  # the pruning schedule really ran and is reported
        assert pruner[0].report() and all(0 < r["kept_fraction"] <= 1 for r in pruner[0].report())


def test_sip_on_a_recipe_without_pruning_is_an_error():
    cfg = load("venvl")
    cfg["model"]["policies"] = [p for p in cfg["model"]["policies"] if p["policy"] != "hte"]
    with pytest.raises(ConfigError, match="sip reconstructs the visual tokens a pruning policy dropped"):
        tiny_system(cfg)


@pytest.mark.parametrize("name, expert", [("venvl", "hte"), ("leomini", "mmoe")])
def test_moe_recipe_on_an_lm_with_an_unsupported_mlp_names_the_layer_type(name, expert):
    torch.manual_seed(0)
    moe = AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        bos_token_id=1, eos_token_id=2, pad_token_id=0), attn_implementation="sdpa")
    with pytest.raises(ConfigError, match=f"{expert} extends a gated MLP.*mlp is Qwen3MoeSparseMoeBlock"):
        tiny_system(load(name), lm=moe)
