"""Tiny random models for tests and examples (seconds on a CPU, no downloads)."""
from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

TINY_LM_KINDS = ("llama", "qwen2", "qwen3")


def tiny_lm_config(kind: str = "llama", **overrides):
    common = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    common.update(overrides)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    raise ValueError(f"unknown tiny LM kind {kind!r}; use one of {TINY_LM_KINDS}")


def tiny_lm(kind: str = "llama", seed: int = 0, attn: str = "sdpa", **overrides):
    torch.manual_seed(seed)
    cfg = tiny_lm_config(kind, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.eval()


def tiny_tokenizer():
    """A character-level tokenizer (ids < 100) matching tiny_lm's vocabulary of 128; no chat template."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


TINY_IMAGE_TOKEN = 100  # "<image>", added to tiny_tokenizer's 100 tokens


def tiny_llava():
    """A tiny random LLaVA (CLIP 48 px, 8 px patches: 36 image tokens; tiny_lm's Llama) at the current torch seed."""
    clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=48, patch_size=8)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=clip, text_config=tiny_lm_config("llama"),
                                                     image_token_index=TINY_IMAGE_TOKEN, image_seq_length=36))


def tiny_llava_processor():
    """tiny_llava's processor: tiny_tokenizer with ``<image>``, CLIP preprocessing to 48 px, and a chat template that
    renders turns as ``role: text`` lines and the generation prompt as ``assistant:``."""
    from transformers import CLIPImageProcessor, LlavaProcessor  # lazy: without torchvision, importing them warns

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tok.convert_tokens_to_ids("<image>") == TINY_IMAGE_TOKEN
    ip = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    template = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=template)


def layout_batch(lm, layouts, seed: int = 0, visual_seed: int | None = None):
    """Left-padded (embeddings, mask, visual mask) from layouts like "ttVVVt" (t: a random vocabulary token,
    V: a random visual embedding). ``visual_seed`` draws the visual rows from their own generator (same text,
    different "image")."""
    g = torch.Generator().manual_seed(seed)
    gv = g if visual_seed is None else torch.Generator().manual_seed(visual_seed)
    L, D = max(len(s) for s in layouts), lm.config.hidden_size
    emb, mask = torch.zeros(len(layouts), L, D), torch.zeros(len(layouts), L, dtype=torch.bool)
    vis = torch.zeros_like(mask)
    for b, s in enumerate(layouts):
        off = L - len(s)
        rows = lm.get_input_embeddings()(torch.randint(3, lm.config.vocab_size, (len(s),), generator=g)).detach()
        v = torch.tensor([c == "V" for c in s])
        rows[v] = torch.randn(int(v.sum()), D, generator=gv)
        emb[b, off:], mask[b, off:], vis[b, off:] = rows, True, v
    return emb, mask, vis


def emulate_no_cache_rename(model: torch.nn.Module) -> int:
    """Make ``model`` behave like a transformers release that no longer renames ``past_key_values`` to ``cache``
    (announced for 5.40): every module whose ``forward`` is wrapped by transformers' ``deprecate_kwarg`` gets, on this
    instance only, a subclass whose ``forward`` is the unwrapped function, so an old keyword falls into ``**kwargs``
    and is ignored. Returns how many modules were changed (0 on releases without the wrapper). For tests only."""
    subclasses: dict[type, type] = {}
    changed = 0
    for module in model.modules():
        cls = type(module)
        raw, fn = None, getattr(cls, "forward", None)
        while fn is not None and raw is None:  # the wrapper may sit under others (gradient checkpointing's)
            code = getattr(fn, "__code__", None)
            if code is not None and code.co_filename.replace("\\", "/").endswith("utils/deprecation.py"):
                raw = fn.__wrapped__
            fn = getattr(fn, "__wrapped__", None)
        if raw is None:
            continue
        if cls not in subclasses:
            subclasses[cls] = type(cls.__name__, (cls,), {"forward": raw, "__module__": cls.__module__})
        module.__class__ = subclasses[cls]
        changed += 1
    return changed
