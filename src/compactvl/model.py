"""CompactVLM: VisionStack → TokenOps → Projector → interleave with text → Runner (docs/design.md, "The one picture").

```
pixels ─► encoders (layer taps) ─► token ops (select / merge / fuse) ─► projector ─► scatter into the prompt's
          image slots ─► Runner (decoder-layer loop; LayerPolicies between layers) ─► logits / generation
```
One model class for every recipe: what differs between VEN-VL, LEO-MINI, LLaVA-STF and the baselines is the list of
encoders, the token-op spec, the projector spec and the layer policies, all in ``VLMConfig`` (saved as JSON beside
the weights, so a saved model needs none of the packages its parts came from).
"""
# Size: one job, the model class and its save / load; its parts (token ops, projectors, policies, the loss, sources)
# live in their own modules, and splitting the class itself would scatter one public type over files.
from __future__ import annotations

import json
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .atomic import free_space, remove_stale, write_dir_atomically
from .encoders import build_encoder
from .errors import CheckpointError, CompactVLError, CompactVLWarning, ConfigError, InputError
from .images import DEFAULT_MAX_PIXELS, ImageLike, load_image
from .losses.next_token import answer_start, next_token_targets
from .manifest import verify_manifest, write_manifest
from .ops import OpContext, build_ops
from .policies import build_policy
from .processor import IGNORE_INDEX, IMAGE_PLACEHOLDER, Batch, Processor
from .projectors import build_projector
from .registry import EXPERTS
from .runner import Runner, RunState, Signals
from .runner.state import resolve_position_policy
from .sources import load_encoder, load_lm
from .tokens import Tokens

CONFIG_NAME = "compactvl_config.json"
WEIGHTS_NAME = "model.safetensors"
# files from_pretrained reads (the tokenizer reads whichever exist): each must be in the manifest when present
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja",
               "chat_template.json")
Conversation = Sequence[tuple[str, "str | None"]]


@dataclass
class VLMConfig:
    encoders: list[dict]  # [{"config": encoder.to_config(), "layer": int | None, "source": str}]
    lm: dict  # the transformers config of the LM (to_dict())
    token_ops: list[dict] = field(default_factory=list)
    projector: dict = field(default_factory=lambda: {"type": "mlp", "depth": 2})
    policies: list[dict] = field(default_factory=list)
    experts: list[dict] = field(default_factory=list)  # MoE surgery on the LM, e.g. [{"expert": "hte", ...}]
    position_policy: str = "auto"  # keep | compact | auto: the policies' reference (compactvl.runner.state)
    image_token: str = IMAGE_PLACEHOLDER
    max_pixels: int = DEFAULT_MAX_PIXELS
    system_prompt: str | None = None
    train_encoders: bool = False
    sources: dict = field(default_factory=dict)  # provenance for humans (what each part was loaded from)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"unknown keys in {CONFIG_NAME}: {unknown}; was it written by a newer compactvl?")
        return cls(**d)


@dataclass
class VLMInputs:
    inputs_embeds: Tensor  # [B, L, D]
    attention_mask: Tensor  # [B, L] bool
    visual_mask: Tensor  # [B, L] bool
    labels: Tensor | None  # [B, L]
    visual_counts: list[list[int]]  # per sample, per image: visual tokens that entered the LM
    aux_loss: Tensor | None = None  # auxiliary losses of learnable token ops
    visual_pos: Tensor | None = None  # [B, L, 2] float: each visual row's (row, col) in its encoder's grid; 0 elsewhere
    # [B] long: the slot where each sample's answer starts (with labels; kept when a scorer drops the labels), so
    # text-reading policies rate with the prompt only (RunState.prompt); None: every row is prompt
    prompt_end: Tensor | None = None


@dataclass
class VLMOutput:
    loss: Tensor | None  # with labels: mean next-token CE over the answer tokens + aux_loss (ce_sum / num_tokens + aux)
    logits: Tensor | None  # [B, L', V] for the rows that reached the last layer (None: forward(return_logits=False))
    state: RunState
    ce_sum: Tensor | None = None  # with labels: next-token CE summed over the answer tokens (fp32)
    num_tokens: int = 0  # the answer tokens ce_sum sums over (targets of rows that reached the last layer)
    aux_loss: Tensor | None = None  # learnable token ops' + policies' / experts' auxiliary losses (None: none)


def _lm_from_config(d: dict, attn: str = "sdpa") -> nn.Module:
    d = {k: v for k, v in d.items() if k != "quantization_config"}
    model_type = d.pop("model_type", None)
    if not model_type:
        raise CheckpointError(f"{CONFIG_NAME}: the LM config has no model_type; re-save the model")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **d), attn_implementation=attn)


class CompactVLM(nn.Module):
    def __init__(self, config: VLMConfig, lm: nn.Module, encoders: Sequence[nn.Module], tokenizer):
        super().__init__()

        if not encoders:
            raise ConfigError("a VLM needs at least one vision encoder")
        if len(encoders) != len(config.encoders):
            raise ConfigError(f"config names {len(config.encoders)} encoders but {len(encoders)} were given")
        self.config = config
        self.lm = lm
        self.encoders = nn.ModuleList(encoders)
        # Tap layers normalised to 0..num_layers (hidden_states index) so token ops and encoders agree.
        self.layers = [e.resolve_layer(e.default_layer if c.get("layer") is None else c["layer"])
                       for e, c in zip(encoders, config.encoders)]
        in_ch = [e.feature_dim(layer) for e, layer in zip(encoders, self.layers)]
        d_model = lm.config.hidden_size
        self.token_ops = build_ops(config.token_ops, in_ch, text_dim=d_model)
        self.projector = build_projector(config.projector, self.token_ops.out_channels, d_model)
        self._apply_experts(config.experts)
        self.processor = Processor(tokenizer, config.image_token, config.system_prompt)
        self.tokenizer = tokenizer
        pols = self._build_policies(config.policies)
        self.runner = Runner(lm, pols, resolve_position_policy(config.position_policy, pols))
        self.policies = nn.ModuleList(self.runner.policies)  # learnable policies (e.g. SIP's head) train and save
        self._notes_shown: set[str] = set()
        self.feature_cache = None  # optional: compactvl.train.FeatureCache (frozen encoders: encode each image once)
        self.taps = self.token_ops.required_layers(self.layers, [e.num_layers + 1 for e in encoders])
        if not config.train_encoders:
            for e in self.encoders:
                e.requires_grad_(False)

    def _apply_experts(self, specs: list[dict]) -> None:
        """Replace LM MLPs with registered expert modules (in place, before weights load in from_pretrained)."""
        for spec in specs:
            spec = dict(spec)
            if "expert" not in spec:
                raise ConfigError(f"an experts entry needs an 'expert' key (one of {', '.join(EXPERTS.names())}), got {spec}")
            EXPERTS.get(spec.pop("expert"))(self.lm, **spec)

    @staticmethod
    def _build_policies(specs: list[dict]):
        if not specs:
            return []

        return [build_policy(s) for s in specs]

    def reconfigure(self, token_ops: Sequence[dict] | None = None, policies: Sequence[dict] | None = None,
                    position_policy: str | None = None) -> "CompactVLM":
        """Swap the pre-LLM token ops, the layer policies and/or the position policy in place, keeping every weight:
        what ``from_pretrained(path, token_ops=..., policies=...)`` gives, without reading the model again. The new
        ops must hand the projector the channel width it was trained on; trained parameters of ops they share by
        position are kept (new learnable ops must not appear: they would be untrained). New policies start fresh,
        as from_pretrained's do. Returns ``self``."""
        if token_ops is not None:
            in_ch = [e.feature_dim(layer) for e, layer in zip(self.encoders, self.layers)]
            ops = build_ops([dict(o) for o in token_ops], in_ch, text_dim=self.lm.config.hidden_size)
            if ops.out_channels != self.token_ops.out_channels:
                raise ConfigError(f"token ops {list(token_ops)} give the projector {ops.out_channels} channels, but "
                                  f"it is trained on {self.token_ops.out_channels}; keep the trained ops and append "
                                  "the reduction")
            missing, _ = ops.load_state_dict(self.token_ops.state_dict(), strict=False)
            if missing:
                raise ConfigError(f"token ops {list(token_ops)} hold parameters the trained model lacks "
                                  f"({sorted(missing)[:3]}); they would be untrained")
            ops.to(self.device)
            self.token_ops = ops
            self.config.token_ops = [dict(o) for o in token_ops]
            self.taps = ops.required_layers(self.layers, [e.num_layers + 1 for e in self.encoders])
        if policies is not None or position_policy is not None:
            specs = self.config.policies if policies is None else [dict(p) for p in policies]
            built = self._build_policies(specs) if policies is not None else list(self.runner.policies)
            pos = self.config.position_policy if position_policy is None else position_policy
            self.runner = Runner(self.lm, built, resolve_position_policy(pos, built))
            self.policies = nn.ModuleList(self.runner.policies).to(self.device)
            self.config.policies, self.config.position_policy = specs, pos
        return self

    @contextmanager
    def variant(self, token_ops: Sequence[dict] | None = None, policies: Sequence[dict] | None = None,
                position_policy: str | None = None) -> Iterator["CompactVLM"]:
        """``with model.variant(policies=[...]):`` — :meth:`reconfigure` for the block, then the model as it was
        (its own ops and policies, trained weights included)."""
        saved = (self.token_ops, self.runner, self.policies, self.taps,
                 self.config.token_ops, self.config.policies, self.config.position_policy)
        try:
            yield self.reconfigure(token_ops, policies, position_policy)
        finally:
            (self.token_ops, self.runner, self.policies, self.taps,
             self.config.token_ops, self.config.policies, self.config.position_policy) = saved

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        lm: str | nn.Module = "smollm2-135m-instruct",
        encoders: Sequence[str | nn.Module] = ("dinov2-small",),
        tokenizer=None,
        token_ops: Sequence[dict] = (),
        projector: dict | None = None,
        policies: Sequence[dict] = (),
        experts: Sequence[dict] = (),
        position_policy: str = "auto",
        encoder_layers: Sequence[int | None] | None = None,
        seed: int = 0,
        **config_kw: Any,
    ) -> "CompactVLM":
        """Assemble a VLM from named pretrained parts (see ``compactvl.sources``) or from modules."""
        sources: dict = {}
        if isinstance(lm, str):
            sources["lm"] = lm
            lm, tokenizer = load_lm(lm)
        if tokenizer is None:
            raise ConfigError("pass the tokenizer that belongs to the LM module (or name the LM to load both)")
        encs = []
        for e in encoders:
            if isinstance(e, str):
                sources.setdefault("encoders", []).append(e)
                e = load_encoder(e)
            encs.append(e)
        layers = list(encoder_layers) if encoder_layers is not None else [None] * len(encs)
        if len(layers) != len(encs):
            raise ConfigError(f"encoder_layers has {len(layers)} entries for {len(encs)} encoders")
        config = VLMConfig(
            encoders=[{"config": e.to_config(), "layer": layer} for e, layer in zip(encs, layers)],
            lm=lm.config.to_dict(),
            token_ops=[dict(s) for s in token_ops],
            projector=dict(projector or {"type": "mlp", "depth": 2}),
            policies=[dict(p) for p in policies],
            experts=[dict(e) for e in experts],
            position_policy=position_policy,
            sources=sources,
            **config_kw,
        )
        torch.manual_seed(seed)  # projector / learnable op initialisation
        return cls(config, lm, encs, tokenizer)

    @classmethod
    def from_recipe(cls, m: dict, seed: int = 0, train_encoders: bool = False) -> "CompactVLM":
        """Assemble the model a recipe's validated ``model`` section describes (``compactvl.config``) from named
        parts; ``seed`` seeds the initialisation of its learned parts (projector, learnable ops)."""
        encoders: list[Any] = []
        for e in m["encoders"]:
            if isinstance(e, dict):
                if "name" not in e:
                    raise ConfigError(f"model.encoders entry {e} has no 'name'; write {{name: dinov2-small, ...}}")
                encoders.append(load_encoder(e["name"], **{k: v for k, v in e.items() if k != "name"}))
            else:
                encoders.append(e)
        kw = {"system_prompt": m["system_prompt"]} if m.get("system_prompt") is not None else {}
        return cls.build(lm=m["lm"], encoders=encoders, token_ops=m["token_ops"], projector=m["projector"],
                         policies=m["policies"], experts=m["experts"], position_policy=m["position_policy"],
                         encoder_layers=m["encoder_layers"], seed=seed, train_encoders=train_encoders, **kw)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    # ------------------------------------------------------------------ vision side
    def encode_images(self, images: Sequence[Any], text_embeds: Tensor | None = None,
                      text_mask: Tensor | None = None):
        """Images (paths or PIL) → (visual tokens [n, N', D], valid mask [n, N'], final Tokens)."""
        pil = [load_image(im, self.config.max_pixels) for im in images]
        outs, streams = [], []
        for i, (enc, layer, taps) in enumerate(zip(self.encoders, self.layers, self.taps)):
            def run(subset: Sequence[Any], enc=enc, taps=taps):
                param = next(enc.parameters(), None)
                pix = enc.preprocess(list(subset)).to(self.device, param.dtype if param is not None else torch.float32)
                with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_encoders):
                    return enc(pix, layers=taps)

            use_cache = self.feature_cache is not None and not self.config.train_encoders
            out = self.feature_cache.lookup(i, pil, taps, run) if use_cache else run(pil)
            outs.append(out)
            streams.append(Tokens.from_encoder(out, layer, source=i))
        ctx = OpContext(encoders=outs, text=text_embeds, text_mask=text_mask)
        tokens = self.token_ops(streams, ctx)
        for note in tokens.notes:
            if note not in self._notes_shown:  # e.g. "no CLS token; used the substitute" — said once
                self._notes_shown.add(note)
                warnings.warn(note, CompactVLWarning, stacklevel=2)
        visual = self.projector(tokens.x.to(self.projector_dtype)).to(self.dtype)
        return visual, tokens.mask, tokens

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    # ------------------------------------------------------------------ text + vision → LM inputs
    def prepare(self, conversations: Sequence[Conversation], images: Sequence[Sequence[ImageLike]],
                with_labels: bool = False) -> VLMInputs:
        """Tokenize conversations, encode their images, and write visual tokens into the image slots."""
        if len(conversations) == 0:
            raise InputError("empty batch: give at least one prompt")
        if len(images) != len(conversations):
            raise InputError(f"got {len(conversations)} prompts but {len(images)} image lists; give one list per prompt")
        encs = [self.processor.encode_conversation(c) for c in conversations]
        for b, (enc, ims) in enumerate(zip(encs, images)):
            if enc.num_images != len(ims):
                raise InputError(
                    f"sample {b}: the prompt has {enc.num_images} image placeholder(s) ('{self.config.image_token}') "
                    f"but {len(ims)} image(s) were given; put one '{self.config.image_token}' in the prompt per image"
                )
        flat = [im for ims in images for im in ims]
        owner = torch.tensor([b for b, ims in enumerate(images) for _ in ims], dtype=torch.long)
        embed = self.runner.embed
        aux = None
        if flat:
            text_ids, text_mask = self.processor.text_batch(encs)
            text = embed(text_ids.to(self.device))
            visual, vmask, tokens = self.encode_images(flat, text[owner.to(self.device)], text_mask.to(self.device)[owner.to(self.device)])
            aux = tokens.aux_loss
            per_image = vmask.sum(-1).tolist()
        else:
            per_image = []
        counts, i = [], 0
        for ims in images:
            counts.append(per_image[i:i + len(ims)])
            i += len(ims)
        batch: Batch = self.processor.assemble(encs, counts, with_labels=with_labels)
        embeds = embed(batch.ids.to(self.device))
        visual_pos = None
        if flat:
            slots = batch.visual_mask.to(self.device)
            embeds = embeds.masked_scatter(slots[..., None], visual[vmask])
            pos = tokens.pos.to(self.device, torch.float32)[vmask]  # the same rows, in the same order
            visual_pos = torch.zeros(*slots.shape, 2, device=self.device).masked_scatter(slots[..., None], pos)
        labels = None if batch.labels is None else batch.labels.to(self.device)
        return VLMInputs(embeds, batch.attention_mask.to(self.device), batch.visual_mask.to(self.device), labels,
                         counts, aux, visual_pos, None if labels is None else answer_start(labels))

    # ------------------------------------------------------------------ training / scoring
    @staticmethod
    def signals(inputs: VLMInputs) -> Signals:
        """The seed of ``state.signals``: what the Runner's policies may read besides the hidden states: each visual
        row's grid position (SIP) and where the answer starts (``RunState.prompt``)."""
        return Signals(visual_pos=inputs.visual_pos, prompt_end=inputs.prompt_end)

    def forward(self, inputs: VLMInputs, return_logits: bool = True) -> VLMOutput:
        """Run the LM over prepared inputs. With labels, the training loss too (the one loss path: the trainer calls
        this): next-token CE of every surviving row against the label of the next *input* token (by original index,
        so it stays right when layer policies drop rows), plus the auxiliary losses. ``return_logits=False`` (with
        labels) computes LM-head logits only for rows that have a target and returns none (training: the LM head
        over a large vocabulary is a large share of the compute)."""
        out = self.runner.prefill(inputs.inputs_embeds, inputs.attention_mask, inputs.visual_mask, use_cache=False,
                                  signals=self.signals(inputs))
        state = out.state
        logits = self.runner.logits(out.hidden) if return_logits or inputs.labels is None else None
        if inputs.labels is None:
            return VLMOutput(None, logits, state)
        target = next_token_targets(state.orig_index, inputs.labels)
        sel = target != IGNORE_INDEX
        n = int(sel.sum())
        if n == 0:
            raise InputError("no answer tokens to train on in this batch; every record needs an assistant answer")
        rows = logits[sel] if logits is not None else self.runner.logits(out.hidden[sel])
        ce = nn.functional.cross_entropy(rows.float(), target[sel], reduction="sum")
        terms = [a for a in [inputs.aux_loss, *state.signals.aux_losses] if a is not None]
        aux = sum(terms[1:], terms[0]) if terms else None
        loss = ce / n if aux is None else ce / n + aux
        return VLMOutput(loss, logits, state, ce, n, aux)

    # ------------------------------------------------------------------ generation
    def eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.lm, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None) if gen is not None else None
        ids |= set(extra if isinstance(extra, (list, tuple)) else [extra])
        return sorted(i for i in ids if i is not None)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str | Conversation], images: Sequence[Sequence[ImageLike]] | None = None,
                 max_new_tokens: int = 32, **gen_kw: Any) -> list[str]:
        """Answer a batch of prompts (each a string with one '<image>' per image, or a conversation whose last
        answer is None). Returns the decoded answers. ``self.last_timing`` holds the call's ``prepare_s`` (images
        encoded, token ops, projector, prompts tokenized) and ``lm_s`` (prefill + decoding) in seconds."""
        t0 = time.perf_counter()
        convs = [[(p, None)] if isinstance(p, str) else list(p) for p in prompts]
        images = [[] for _ in convs] if images is None else images
        inputs = self.prepare(convs, images)
        eos = self.eos_token_ids()
        t1 = time.perf_counter()
        out = self.runner.generate(inputs.inputs_embeds, inputs.attention_mask, inputs.visual_mask,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos,
                                   pad_token_id=self.processor.pad_token_id, **gen_kw)
        self.last_timing = {"prepare_s": t1 - t0, "lm_s": time.perf_counter() - t1}
        self.last_first_logprobs = out.first_logprobs  # the answer distribution's first token, for divergences
        return [self.processor.decode(t) for t in out.token_lists(eos)]

    def chat(self, image: ImageLike | None, prompt: str, max_new_tokens: int = 64, **gen_kw: Any) -> str:
        """One image + one question → answer. Adds the image placeholder if the prompt has none."""
        tok = self.config.image_token
        if image is not None and tok not in prompt:
            prompt = f"{tok}\n{prompt}"
        return self.generate([prompt], [[image] if image is not None else []], max_new_tokens, **gen_kw)[0]

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
        """Write config JSON + safetensors + tokenizer (+ ``extra_files``, name -> text) and last ``manifest.json``
        (every file's size and SHA-256) atomically: a temp dir, fsynced, renamed into place."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(path.parent)  # temp dirs of an earlier save that was killed
        except OSError as e:
            raise CheckpointError(f"cannot create {path.parent}: {e}; choose a writable directory") from e

        def write(tmp: Path) -> None:
            cfg = self.config.to_dict()
            cfg["lm"] = self.lm.config.to_dict()
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, default=str))
            save_model(self, str(tmp / WEIGHTS_NAME))
            self.tokenizer.save_pretrained(str(tmp))
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            write_manifest(tmp)

        try:
            write_dir_atomically(path, write)
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error, not OSError
            raise CheckpointError(f"could not write the model to {path}: {e} ({free_space(path)}); check the "
                                  "directory is writable and the disk has room") from e
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, attn_implementation: str = "sdpa", verify: bool = False,
                        **overrides: Any) -> "CompactVLM":
        """Load a directory written by ``save_pretrained``. ``overrides`` replace config fields (e.g. policies). The
        directory is checked against its manifest first: every file's size, and the SHA-256 of the small ones
        (configs, tokenizer); ``verify=True`` hashes the weights too. Damage is a CheckpointError naming the file."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"model directory not found: {path}")
        path = find_model_dir(path) or path  # a run directory (compactvl train / demo) names the model inside it
        for name in (CONFIG_NAME, WEIGHTS_NAME, "tokenizer_config.json"):
            if not (path / name).is_file():
                raise CheckpointError(f"{path} is missing {name}; it is not a complete compactvl model directory "
                                      "(re-save it with model.save_pretrained)")
        todo = "re-save the model with save_pretrained (or copy it again from where it came from)"
        verify_manifest(path, full=verify, todo=todo, must_list=MODEL_FILES)
        reading = path / CONFIG_NAME
        try:  # the manifest matched, so these fail only on a directory written wrong: name the file all the same
            raw = json.loads((path / CONFIG_NAME).read_text())
            if not isinstance(raw, dict):
                raise TypeError(f"a JSON {type(raw).__name__} where an object belongs")
            config = VLMConfig.from_dict({**raw, **overrides})
            lm = _lm_from_config(config.lm, attn_implementation)
            encoders = [build_encoder(e["config"]) for e in config.encoders]
            reading = f"the tokenizer files {[n for n in MODEL_FILES[2:] if (path / n).exists()]} in {path}"
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = cls(config, lm, encoders, tokenizer)
            reading = path / WEIGHTS_NAME
            missing, unexpected = load_model(model, str(path / WEIGHTS_NAME), strict=False)
        except (ValueError, TypeError, KeyError, AttributeError, OSError, SafetensorError) as e:
            if isinstance(e, CompactVLError):
                raise
            raise CheckpointError(f"cannot load {reading} ({type(e).__name__}: {e}); {todo}") from e
        if "policies" in overrides:  # evaluating with other policies: their weights are not in the checkpoint
            missing = [k for k in missing if not k.startswith("policies.")]
            unexpected = [k for k in unexpected if not k.startswith("policies.")]
        if missing or unexpected:
            raise CheckpointError(f"{path / WEIGHTS_NAME} does not match the config: missing {sorted(missing)[:5]}, "
                                  f"unexpected {sorted(unexpected)[:5]}; re-save the model")
        return model.eval()


RUN_MODEL_DIRS = (".", "model", "train/model")  # a model dir, a `compactvl train` run, a `compactvl demo` run


def find_model_dir(path: str | os.PathLike) -> Path | None:
    """The saved model a path names: the directory itself when it holds a model, else the model inside a run
    directory (``RUN/model`` from ``compactvl train``, ``RUN/train/model`` from ``compactvl demo``); None if none."""
    root = Path(path)
    for sub in RUN_MODEL_DIRS:
        if (root / sub / CONFIG_NAME).is_file():
            return (root / sub) if sub != "." else root
    return None
