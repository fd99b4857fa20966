"""The model ``compactvl bench`` measures (an LM preset or config with random weights, a saved CompactVLM's LM, or a
transformers VLM's LM) and its synthetic inputs (prompt embeddings with visual vectors after a text prefix)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..compression import load_compressed
from ..errors import ConfigError, InputError
from ..measure.macs import get_lm_config, lm_shape
from ..measure.presets import LM_PRESETS
from ..model import CompactVLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchModel:
    lm: nn.Module
    name: str
    source: str  # preset | config | compactvl | transformers
    model_policies: list[dict] | None = None  # a CompactVLM's configured policies
    position_policy: str = "keep"
    position_axes: int = 0  # 3 for M-RoPE LMs (position ids [3, B, L]), else 0 ([B, L])

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    def describe(self) -> dict:
        c = self.lm.config
        return dict(name=self.name, source=self.source, model_type=c.model_type, num_layers=c.num_hidden_layers,
                    hidden_size=c.hidden_size, parameters=sum(p.numel() for p in self.lm.parameters()),
                    dtype=str(self.dtype).replace("torch.", ""), device=str(self.device),
                    attn_implementation=getattr(c, "_attn_implementation", None),
                    position_policy=self.position_policy,
                    weights="random" if self.source in ("preset", "config") else "loaded")


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available in this torch build; use --device cpu")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_bench_model(llm: str | None = None, model_dir: str | None = None, device: str | None = None,
                     dtype: str | None = None, seed: int = 0, attn: str = "sdpa",
                     position_policy: str = "keep", vlm: str | None = None) -> BenchModel:
    """``llm``: an LM preset or config path, built with random weights (seeded); ``model_dir``: a saved CompactVLM;
    or ``vlm``: a transformers VLM directory or hub id of a family compactvl adapts (``compactvl.adapters``). A loaded
    model's language model is benchmarked with synthetic visual embeddings (its own weights; its vision tower is not
    timed). M-RoPE models (Qwen-VL) get the same position on their three axes: the cost does not depend on values."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if sum(x is not None for x in (llm, model_dir, vlm)) != 1:
        raise ConfigError("give exactly one of --llm PRESET|PATH (random weights), --model DIR (a saved compactvl "
                          "model) or --vlm PATH|HUB_ID (a transformers VLM)")
    if vlm is not None:
        cvlm = load_compressed(vlm, None, dtype=dt, device=dev, attn_implementation=attn, load_processor=False)
        return BenchModel(cvlm.lm.eval(), str(vlm), "transformers", position_policy=position_policy,
                          position_axes=3 if cvlm.adapter.mrope else 0)
    if model_dir is not None:
        saved = CompactVLM.from_pretrained(model_dir, attn_implementation=attn)
        lm = saved.lm.to(device=dev, dtype=dt).eval()
        return BenchModel(lm, str(model_dir), "compactvl", [dict(p) for p in saved.config.policies],
                          saved.runner.position_policy)  # as resolved for its policies ("auto" -> keep | compact)
    config = get_lm_config(llm)
    lm_shape(config)  # a supported decoder type, or a ConfigError naming the fix
    torch.manual_seed(seed)
    with torch.device(dev):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dt)
    return BenchModel(lm.eval(), str(llm), "preset" if str(llm).lower() in LM_PRESETS else "config",
                      position_policy=position_policy)


def make_inputs(lm: nn.Module, visual: int, text: int, prefix: int, batch: int, seed: int = 0):
    """Synthetic prompt embeddings ``[B, prefix + visual + (text - prefix), D]``: random token ids embedded by the
    LM, with ``visual`` random vectors (scaled like the embedding table) after the first ``prefix`` text tokens.
    Returns (embeds, visual_mask)."""
    if text < 1:
        raise InputError("--text must be >= 1: the first token is predicted from the last text token")
    if not 0 <= prefix < text:
        raise InputError(f"prefix {prefix} must be in 0..text-1 ({text - 1}): at least one text token follows the image")
    emb = lm.get_input_embeddings()
    gen = torch.Generator().manual_seed(seed)
    vocab = emb.weight.shape[0]
    ids = torch.randint(0, vocab, (batch, text), generator=gen)
    with torch.no_grad():
        text_emb = emb(ids.to(emb.weight.device))
        scale = float(emb.weight[:4096].float().std())
        vis = (torch.randn(batch, visual, text_emb.shape[-1], generator=gen) * scale).to(text_emb)
    embeds = torch.cat([text_emb[:, :prefix], vis, text_emb[:, prefix:]], dim=1)
    vmask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    vmask[:, prefix:prefix + visual] = True
    return embeds, vmask
