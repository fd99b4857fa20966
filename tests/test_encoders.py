"""Vision encoders on tiny random configs: attention/keys vs Hugging Face eager attention, batch invariance, layer
and grid conventions, config/save round trips, preprocessing, TF-SAME padding, and error messages."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, CLIPVisionModel, Dinov2Config, Dinov2Model

from compactvl.encoders import build_encoder, tiny_encoder
from compactvl.encoders.efficientnet_lite import SameConv2d
from compactvl.errors import ConfigError, InputError
from compactvl.registry import ENCODERS
from compactvl.sources import load_encoder

VITS = ["clip", "siglip", "dinov2"]
KINDS = VITS + ["efficientnet"]


@pytest.fixture(scope="module")
def encoders():
    return {k: tiny_encoder(k) for k in KINDS}


def pixels(b=3, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def block_of(model, i):
    enc = model.encoder
    return (enc.layers if hasattr(enc, "layers") else enc.layer)[i]


@pytest.mark.parametrize("kind", VITS)
def test_attention_and_keys_match_eager_hf(encoders, kind):
    enc = encoders[kind]
    eager = AutoModel.from_config(enc.model.config, attn_implementation="eager").eval()
    eager.load_state_dict(enc.model.state_dict())
    keys = {}  # block (1-based) -> output of its key projection, captured from the eager model
    for i in range(3):
        b = block_of(eager, i)
        attn = b.self_attn if hasattr(b, "self_attn") else b.attention
        k_proj = attn.k_proj if hasattr(attn, "k_proj") else attn.attention.key
        k_proj.register_forward_hook(lambda m, a, out, i=i: keys.__setitem__(i + 1, out))
    x = pixels()
    with torch.no_grad():
        out = enc(x)
        ref = eager(pixel_values=x, output_attentions=True)
        p = enc.num_prefix
        assert p == (0 if kind == "siglip" else 1)
        assert out.attention_substitute == (kind == "siglip") and (out.cls is None) == (kind == "siglip")
        for layer in (1, 2, 3, -1, -2):
            a = ref.attentions[layer - 1 if layer > 0 else layer]  # [B, H, T, T]
            expect = a.mean(2) if kind == "siglip" else a[:, :, 0, p:]
            got = out.attention(layer)
            assert got.shape == (3, 4, 16)
            torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(out.keys(layer), keys[layer if layer > 0 else 4 + layer][:, p:])
        # the CLS row does not sum to 1 over patches alone (CLS column excluded, not renormalised)
        if kind != "siglip":
            assert (out.attention(1).sum(-1) < 1 - 1e-4).all()


def test_no_cls_substitute_is_chunk_invariant(encoders, monkeypatch):
    import compactvl.encoders.hf_vit as hf_vit

    enc = encoders["siglip"]
    with torch.no_grad():
        out = enc(pixels(2))
        whole = out.attention(2)
        monkeypatch.setattr(hf_vit, "QUERY_CHUNK", 5)  # 16 queries in chunks of 5, 5, 5, 1
        torch.testing.assert_close(out.attention(2), whole)
        torch.testing.assert_close(whole.sum(-1), torch.ones(2, 4))  # mean of rows that each sum to 1


@pytest.mark.parametrize("kind", KINDS)
def test_batch1_equals_batchN(encoders, kind):
    enc, x = encoders[kind], pixels(4)
    with torch.no_grad():
        full = enc(x)
        for b in range(4):
            one = enc(x[b : b + 1])
            for layer, f in full.features.items():
                torch.testing.assert_close(one.features[layer][0], f[b], atol=1e-5, rtol=1e-5)
            if kind in VITS:
                torch.testing.assert_close(one.attention(-1)[0], full.attention(-1)[b], atol=1e-6, rtol=1e-5)
            if full.cls is not None:
                torch.testing.assert_close(one.cls[0], full.cls[b], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_build_encoder_roundtrip(encoders, kind):
    enc = encoders[kind]
    cfg = json.loads(json.dumps(enc.to_config()))  # JSON-able
    twin = build_encoder(cfg)
    assert type(twin) is type(enc) and twin.to_config() == enc.to_config()
    x = pixels(2)
    with torch.no_grad():
        assert not torch.allclose(twin.eval()(x).features[enc.default_layer], enc(x).features[enc.default_layer])
        twin.load_state_dict(enc.state_dict())
        taps = [1, enc.default_layer] if kind in VITS else [enc.default_layer]
        a, b = enc(x, taps), twin.eval()(x, taps)
    for layer in taps:  # same weights, same arithmetic (bitwise equality is not promised by CPU kernels)
        torch.testing.assert_close(a.features[layer], b.features[layer], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "efficientnet"])
def test_save_pretrained_load_encoder(encoders, kind, tmp_path):
    enc = encoders[kind]
    enc.save_pretrained(tmp_path)
    back = load_encoder(tmp_path)
    assert back.to_config() == enc.to_config()
    x = pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(back(x).features[enc.default_layer], enc(x).features[enc.default_layer])


def test_hf_dir_loads_with_processor_knobs(tmp_path):
    conf = Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=28, patch_size=7)
    torch.manual_seed(0)
    model = Dinov2Model(conf).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 21, "width": 21}, "do_center_crop": True, "image_mean": [0.1, 0.2, 0.3],
         "image_std": [0.4, 0.5, 0.6]}))
    enc = load_encoder(str(tmp_path))
    assert (enc.image_size, enc.image_mean, enc.image_std) == (21, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert (enc.num_layers, enc.patch_size, enc.default_layer, enc.grid_for()) == (2, 7, -1, (3, 3))
    x = pixels(2, 21)
    with torch.no_grad():
        out = enc(x, [0, 1, -1])
        hs = model(pixel_values=x, output_hidden_states=True).hidden_states
    assert out.grid == (3, 3) and list(out.features) == [0, 1, -1]
    for layer in (0, 1, -1):
        torch.testing.assert_close(out.features[layer], hs[layer][:, 1:])
    torch.testing.assert_close(out.cls, hs[-1][:, 0])
    assert load_encoder(str(tmp_path), image_size=14, default_layer=1).image_size == 14


def test_full_clip_checkpoint_loads_its_vision_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    full = CLIPModel(CLIPConfig(vision_config=vision, text_config=text)).eval()
    full.save_pretrained(tmp_path)
    enc = load_encoder(tmp_path)
    assert type(enc.model).__name__ == "CLIPVisionModel" and enc.default_layer == -2 and enc.has_cls
    with torch.no_grad():
        hs = full.vision_model(pixel_values=pixels(2), output_hidden_states=True).hidden_states
        torch.testing.assert_close(enc(pixels(2)).features[-2], hs[-2][:, 1:])


def test_clip_defaults_interpolation_and_post_norm(encoders):
    enc = encoders["clip"]
    assert enc.default_layer == -2 and enc.image_mean[0] == pytest.approx(0.48145466)
    ref = CLIPVisionModel(enc.model.config).eval()
    ref.load_state_dict(enc.model.state_dict())
    x = pixels(2, 48)  # larger than the config's 32: position embeddings are interpolated
    with torch.no_grad():
        out = enc(x)
        hs = ref(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
    assert out.grid == (6, 6) and list(out.features) == [-2]
    torch.testing.assert_close(out.features[-2], hs[-2][:, 1:])
    dino = build_encoder({**encoders["dinov2"].to_config(), "post_norm": True})
    dino.load_state_dict(encoders["dinov2"].state_dict())
    with torch.no_grad():
        last = dino.model(pixel_values=pixels(2)).last_hidden_state
        torch.testing.assert_close(dino(pixels(2), [-1]).features[-1], last[:, 1:])
        torch.testing.assert_close(dino(pixels(2), [2]).features[2], encoders["dinov2"](pixels(2), [2]).features[2])


def test_features_are_row_major(encoders):
    enc = encoders["dinov2"]  # layer 0 = patch embedding + position: token-local
    x = pixels(1)
    y = x.clone()
    y[:, :, 8:16, 16:24] += 1.0  # the patch at grid row 1, column 2
    with torch.no_grad():
        changed = (enc(x, [0]).features[0] - enc(y, [0]).features[0]).abs().amax(-1)[0]
    assert changed.nonzero().flatten().tolist() == [1 * 4 + 2]


def test_preprocess_shorter_side_and_center_crop(encoders):
    enc = encoders["siglip"]  # mean = std = 0.5
    img = np.zeros((40, 120, 3), np.uint8)
    img[:, 40:80] = 255  # a white centre third: after resize 40 -> 32 and a centre crop, only white is left
    x = enc.preprocess([Image.fromarray(img), Image.fromarray(img[:, :, 0]).convert("L")])
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, :, :, 4:-4], torch.ones(2, 3, 32, 24))  # (1 - 0.5) / 0.5
    with pytest.raises(InputError, match="list of PIL images"):
        enc.preprocess([np.zeros((4, 4, 3))])


def test_same_padding_matches_tensorflow():
    conv = SameConv2d(2, 3, 3, 2, bias=False)
    for size, pad in ((8, (0, 1)), (7, (1, 1))):  # TF SAME: total = (ceil(n/s)-1)*s + k - n, extra on the far side
        x = torch.randn(1, 2, size, size)
        expect = F.conv2d(F.pad(x, (*pad, *pad)), conv.weight, stride=2)
        torch.testing.assert_close(conv(x), expect)
        assert conv(x).shape[-1] == -(-size // 2)


def test_efficientnet_stages(encoders):
    enc = encoders["efficientnet"]
    assert (enc.num_layers, enc.default_layer, enc.patch_size, enc.hidden_size) == (5, 3, 8, 32)
    assert [enc.grid_for(i) for i in range(6)] == [(16, 16), (16, 16), (8, 8), (4, 4), (2, 2), (2, 2)]
    with torch.no_grad():
        out = enc(pixels(2), [4, -1])
        assert out.grid == (2, 2) and out.features[4].shape == (2, 4, 48) and out.features[-1].shape == (2, 4, 64)
        assert enc.classify(pixels(2)).shape == (2, 10)
        assert out.cls is None and not out.attention_substitute
        with pytest.raises(ConfigError, match="different grids"):
            enc(pixels(2), [3, 4])
    for fn in (out.attention, out.keys):
        with pytest.raises(ConfigError, match="tiny-efficientnet.*does not need attention"):
            fn(3)


def test_bad_inputs_name_problem_and_fix(encoders):
    enc = encoders["clip"]
    with pytest.raises(ConfigError, match=r"layer 4 is out of range .* 3 blocks; use 0\.\.3"):
        enc(pixels(1), [4])
    with pytest.raises(ConfigError, match="empty layer list"):
        enc(pixels(1), [])
    out = enc(pixels(1))
    with pytest.raises(ConfigError, match="layer 0 is the embeddings"):
        out.attention(0)
    with pytest.raises(InputError, match=r"\[B, 3, H, W\].*preprocess"):
        enc(torch.zeros(1, 32, 32))
    with pytest.raises(InputError, match="divisible by 8"):
        enc(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ConfigError, match="kind 'vit'.*clip, siglip, dinov2, efficientnet"):
        tiny_encoder("vit")
    with pytest.raises(ConfigError, match="'type' key.*efficientnet_lite, hf_vit"):
        build_encoder({"name": "x"})
    assert {"hf_vit", "efficientnet_lite"} <= set(ENCODERS.names())
