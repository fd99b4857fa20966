"""``train.lr_scale``: per-module multipliers of ``train.lr`` (longest matching module-name prefix wins; the LM's
pretrained weights keep ``lm_lr``). The optimizer's groups are checked against an independent rule by name, one AdamW
step against the update computed by hand, and bad input against its error messages. Tiny random parts (seconds)."""
from __future__ import annotations

import pytest
import torch

from compactvl.config import load_config
from compactvl.demo import tiny_model
from compactvl.errors import ConfigError
from compactvl.train import Trainer, build_train_data, collate, configure_trainable
from compactvl.train.trainable import param_groups

HTE = {"experts": [{"expert": "hte", "layers": "second_half", "num_experts": 2}]}


def cfg_with(train: dict, model: dict | None = None, out: str = "runs/t") -> dict:
    return load_config({
        "model": {"token_ops": [{"op": "avgpool", "k": 2}], "system_prompt": "", **(model or {})},
        "data": {"train": [{"name": "synthvqa", "n": 8}]},
        "train": {"batch_size": 8, "max_steps": 1, "warmup_steps": 0, "precision": "fp32", "feature_cache": "off",
                  **train},
        "output_dir": out})


def expected_lr(name: str, stage: str) -> float:
    """The rule of the test below, written out by name: lr 1e-3, lm_lr 1e-5, lr_scale {projector: 0.5,
    projector.net.2: 3, lm.model.layers.3: 0.1}."""
    new_in_lm = ".experts." in name or ".router." in name
    if name.startswith("lm.") and not new_in_lm:
        return 1e-5  # pretrained LM weights (full sft) keep lm_lr even under lm.model.layers.3
    if name.startswith("projector.net.2."):
        return 3e-3
    if name.startswith("projector."):
        return 5e-4
    if name.startswith("lm.model.layers.3."):
        return 1e-4
    return 1e-3


@pytest.mark.parametrize("stage", ["align", "sft"])
def test_each_parameter_gets_the_multiplier_of_its_longest_prefix(tmp_path, stage):
    scale = {"projector": 0.5, "projector.net.2": 3, "lm.model.layers.3": 0.1}
    cfg = cfg_with({"stage": stage, "lr": 1e-3, "lm_lr": 1e-5, "weight_decay": 0.1, "lr_scale": scale}, HTE)
    model = tiny_model(cfg)
    t = Trainer(model, build_train_data(cfg["data"]["train"]), cfg, output_dir=tmp_path, progress=False, log=None)
    t._setup()  # builds the optimizer exactly as fit() does
    by_id = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for g in t.opt.param_groups:
        for p in g["params"]:
            seen[by_id[id(p)]] = (g["initial_lr"], g["weight_decay"])
    assert sorted(seen) == sorted(t.names)  # every trainable parameter is in exactly one group
    lrs = {n: lr for n, (lr, _) in seen.items()}
    for n, (lr, wd) in seen.items():
        assert lr == pytest.approx(expected_lr(n, stage), rel=1e-12), n
        assert wd == (0.1 if model.get_parameter(n).ndim >= 2 else 0.0), n
    assert {1e-4, 5e-4} <= {round(v, 12) for v in lrs.values()}  # the rule was exercised (experts of layer 3)
    if stage == "sft":
        assert any(v == 1e-5 for v in lrs.values())


def test_one_adamw_step_equals_the_update_computed_by_hand(tmp_path):
    """Step 1 of AdamW (bias-corrected m = g, v = g²): p ← p·(1 − lr·wd) − lr·g / (|g| + eps), with each parameter's
    own lr = train.lr × its multiplier; the gradient from an identical model on the same batch."""
    lr, wd, eps = 1e-2, 0.1, 1e-8
    scale = {"projector.net.0": 0.25, "projector.net.0.bias": 4.0}
    cfg = cfg_with({"stage": "align", "lr": lr, "weight_decay": wd, "max_grad_norm": 0, "lr_scale": scale})
    model = tiny_model(cfg)
    data = build_train_data(cfg["data"]["train"])
    t = Trainer(model, data, cfg, output_dir=tmp_path, progress=False, log=None)
    t.fit(export=False)

    ref = tiny_model(cfg)
    names = configure_trainable(ref, "align")
    ref.train()
    ref.encoders.train(False)
    b = collate([data[i] for i in t.visited(0, 1, all_ranks=True)])
    out = ref(ref.prepare(b.conversations, b.images, with_labels=True), return_logits=False)
    (out.ce_sum / out.num_tokens).backward()
    mult = {"projector.net.0.weight": 0.25, "projector.net.0.bias": 4.0}
    assert set(mult) <= set(names)
    for n in names:
        p = ref.get_parameter(n)
        lr_p = lr * mult.get(n, 1.0)
        wd_p = wd if p.ndim >= 2 else 0.0
        want = p.detach() * (1 - lr_p * wd_p) - lr_p * p.grad / (p.grad.abs() + eps)
        torch.testing.assert_close(model.get_parameter(n).detach(), want, rtol=0, atol=2e-6, msg=n)
        unscaled = p.detach() * (1 - lr * wd_p) - lr * p.grad / (p.grad.abs() + eps)
        if n in mult:  # the multiplier made a difference the tolerance sees
            assert (model.get_parameter(n).detach() - unscaled).abs().max() > 1e-3, n


def test_no_lr_scale_keeps_the_two_learning_rates():
    cfg = cfg_with({"stage": "sft", "lr": 2e-3, "lm_lr": 1e-4})
    model = tiny_model(cfg)
    configure_trainable(model, "sft")
    assert sorted({g["lr"] for g in param_groups(model, cfg["train"])}) == [1e-4, 2e-3]


@pytest.mark.parametrize("scale, needle", [
    ({"projecter": 2.0}, r"prefix\(es\) projecter match no trainable parameter.*prefixes that exist: .*projector"),
    ({"projector.net.9": 2.0}, r"projector\.net\.9 match no.*projector\.net"),
    ({"proj": 2.0}, r"proj match no"),  # a prefix is a whole dotted name, not the start of one
    ({"lm.model.embed_tokens": 2.0}, r"holds only the LM's pretrained weights, whose rate is train\.lm_lr"),
])
def test_a_prefix_that_matches_no_parameter_names_the_prefixes_that_exist(scale, needle):
    cfg = cfg_with({"stage": "sft", "lr_scale": scale})
    model = tiny_model(cfg)
    configure_trainable(model, "sft")
    with pytest.raises(ConfigError, match=needle):
        param_groups(model, cfg["train"])


def test_the_lm_prefix_in_align_scales_what_surgery_added_only():
    cfg = cfg_with({"stage": "align", "lr": 1e-3, "lr_scale": {"lm": 0.5}}, HTE)
    model = tiny_model(cfg)
    configure_trainable(model, "align")
    by_id = {id(p): n for n, p in model.named_parameters()}
    for g in param_groups(model, cfg["train"]):
        for p in g["params"]:
            n = by_id[id(p)]
            assert g["lr"] == pytest.approx(5e-4 if n.startswith("lm.") else 1e-3), n


@pytest.mark.parametrize("value, needle", [
    ({"projector": 0}, r"train\.lr_scale\.projector must be a number > 0.*got 0"),
    ({"projector": -1.5}, r"must be a number > 0"),
    ({"projector": "fast"}, r"must be a number > 0.*'fast'"),
    ({"projector": True}, r"must be a number > 0"),
    ({"projector": float("nan")}, r"must be a number > 0"),
    ({".projector": 1.0}, r"'\.projector' is not a module-name prefix"),
    ({"": 1.0}, r"is not a module-name prefix"),
    ([0.5], r"train\.lr_scale must be a mapping of module-name prefixes"),
    (0.5, r"train\.lr_scale must be a mapping"),
])
def test_bad_lr_scale_values_fail_in_the_config(value, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config({"train": {"lr_scale": value}})


def test_lr_scale_from_the_command_line():
    cfg = load_config({}, ["--train.lr_scale", "{projector: 0.5, token_ops.1: 2}"])
    assert cfg["train"]["lr_scale"] == {"projector": 0.5, "token_ops.1": 2}
    assert load_config({})["train"]["lr_scale"] is None
