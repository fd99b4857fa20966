"""Training: ``Trainer`` (stages align / sft, checkpoints with exact resume, data parallel through accelerate), the
encoder-feature cache, the collator, and builders that turn a resolved recipe (``compactvl.config``) into a model and
datasets. Modules: ``trainer`` (the loop), ``factories`` (model / data from a recipe), ``trainable`` (stages, LoRA,
optimizer groups), ``checkpoint``, ``parallel``, ``feature_cache``, ``standardize``."""
from ..data.collate import Collator, SampleBatch, collate, sample_turns
from .checkpoint import Checkpoints, list_checkpoints, load_checkpoint
from .factories import build_dataset, build_model, build_train_data
from .feature_cache import CacheView, FeatureCache, image_key, warm_cache
from .parallel import Parallel
from .trainable import add_lora, configure_trainable, merge_lora
from .trainer import TrainResult, Trainer, lr_factor

__all__ = ["CacheView", "Checkpoints", "Collator", "FeatureCache", "Parallel", "SampleBatch", "TrainResult", "Trainer",
           "add_lora", "build_dataset", "build_model", "build_train_data", "collate", "configure_trainable",
           "image_key", "list_checkpoints", "load_checkpoint", "lr_factor", "merge_lora", "sample_turns", "warm_cache"]
