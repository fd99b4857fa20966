"""Multi-Block Token Fusion, MBTF (LLaVA-STF, Sec. 3.3, eq. 1).

Equation: X = GeLU(W₂ · GeLU(W₁ · concat_c(F_{l₁}, ..., F_{l_L}))) per grid cell (two 1×1 convolutions with channel
reduction), where F_l are the patch features of encoder block l. Paper defaults (CLIP ViT-L/14, 24 blocks): 8 blocks
every third one, 8·1024 → 4096 → 1024.
Knobs: ``layers`` (explicit list of encoder taps; default: the selected layer and every ``every``-th layer below it,
``count`` taps in all, e.g. selected 23 → 2, 5, ..., 23), ``every`` (3), ``count`` (8), ``hidden`` (W₁ width,
default 4·C), ``out`` (W₂ width, default C), ``init`` (see below), ``streams``.
Initialisation and step-0 equivalence (issue 19): the baseline MBTF extends is the selected block alone (the
tokens it receives, F_sel: LLaVA-STF Table 3's "w/o MBTF"). ``init="last"`` adds F_sel as a skip connection,
X = F_sel + GeLU(W₂ · GeLU(W₁ · concat_c(F))), with W₂ and its bias zero at initialisation (GeLU(0) = 0), so at
step 0 MBTF passes the selected block's features through unchanged and the model equals the one without MBTF;
W₁ keeps PyTorch's default init and learns once W₂ moves (W₂ gets a gradient from the first step). It needs
out = C. ``init="random"`` is the paper's plain eq. 1 (no skip). Default (``init=None``): "last" whenever
out = C (the default), else "random". The features come from ``OpContext.encoders[..].features``
— ask the encoder for ``TokenPipeline.required_layers(...)``. MBTF must see the encoder's full grid, so put it first.
Expected tokens: unchanged (h·w); the grid is kept.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..tokens import Tokens
from .base import OpContext, StreamOp, check_int, register


@register("mbtf")
class MBTF(StreamOp):
    def __init__(self, in_channels: list[int], *, layers: list[int] | None = None, every: int = 3, count: int = 8,
                 hidden: int | None = None, out: int | None = None, init: str | None = None,
                 streams: list[int] | None = None):
        super().__init__(in_channels, streams)
        self.layers = None if layers is None else [int(x) for x in layers]
        self.every, self.count = check_int(every, "every", "mbtf"), check_int(count, "count", "mbtf")
        if self.layers is not None and not self.layers:
            raise ConfigError("mbtf: layers=[] selects no encoder block; list the blocks to fuse or drop the knob")
        if init not in (None, "last", "random"):
            raise ConfigError(f"mbtf: init={init!r}; use 'last' (starts as the selected block's features), "
                              "'random' (the paper's init) or leave it unset")
        self.hidden, self.out, self.init = hidden, out, init
        L = len(self.layers) if self.layers is not None else self.count
        self.nets = nn.ModuleDict({str(i): nn.Sequential(
            nn.Linear(L * in_channels[i], hidden or 4 * in_channels[i]), nn.GELU(),
            nn.Linear(hidden or 4 * in_channels[i], out or in_channels[i]), nn.GELU()) for i in self.targets})
        bad = [in_channels[i] for i in self.targets if (out or in_channels[i]) != in_channels[i]]
        if init == "last" and bad:
            raise ConfigError(f"mbtf: init='last' adds the selected block's {bad[0]} channels to the output, so it "
                              f"needs out = {bad[0]} (got out={out}); drop out or use init='random'")
        self.skip = init == "last" or (init is None and not bad)
        if self.skip:  # step 0 == the selected block's features: the fusion branch's last layer starts at zero
            # saved with the weights: a checkpoint of the plain eq. 1 (no skip) then fails to load, loudly
            self.register_buffer("last_skip", torch.ones((), dtype=torch.bool))
            with torch.no_grad():
                for net in self.nets.values():
                    net[2].weight.zero_(), net[2].bias.zero_()

    def taps(self, selected: int, num_layers: int | None = None) -> list[int]:
        fix = (lambda x: x + num_layers if x < 0 and num_layers is not None else x)
        if self.layers is not None:
            return sorted(fix(x) for x in self.layers)
        sel = fix(selected)
        taps = [sel - self.every * j for j in range(self.count)]
        if taps[-1] < 0:
            raise ConfigError(f"mbtf: {self.count} blocks every {self.every} below layer {sel} reach layer "
                              f"{taps[-1]} < 0; lower count or every, or list layers explicitly")
        return sorted(taps)

    def required_layers(self, stream: int, default_layer: int, num_layers: int) -> list[int]:
        return self.taps(default_layer, num_layers) if stream in self.targets else []

    def apply(self, t: Tokens, ctx: OpContext, i: int) -> Tokens:
        if t.grid != t.grid0 or t.x.shape[1] != t.assign.shape[1]:
            raise InputError("mbtf fuses encoder blocks on the encoder's own grid, but the tokens were already "
                             "reduced; put mbtf first in the recipe")
        if self.layers is None and t.layer is None:
            raise InputError("mbtf needs to know which encoder layer the tokens came from; build them with "
                             "Tokens.from_encoder(out, layer) or set the layers knob")
        if t.layer is not None and t.layer < 0 and self.layers is None:
            raise InputError(f"mbtf: the tokens come from layer {t.layer}; build them with the non-negative index "
                             "(num_layers + layer) as returned by TokenPipeline.required_layers")
        feats = ctx.encoder(t, "mbtf").features
        taps = self.taps(t.layer) if t.layer is not None else self.taps(0)
        missing = [x for x in taps if x != t.layer and x not in feats]
        if missing:
            raise InputError(f"mbtf needs encoder layers {taps} but the encoder output lacks {missing}; request "
                             "the taps from TokenPipeline.required_layers(default_layer, num_layers)")
        x = torch.cat([t.x if x == t.layer else feats[x].to(t.x.dtype) for x in taps], -1)
        y = self.nets[str(i)](x)
        return t.replace(x=y + t.x if self.skip else y)

    def channels(self, c: int, i: int) -> int:
        return self.out or c

    def grid_out(self, grid: tuple[int, int] | None) -> tuple[int, int] | None:
        return grid
