"""Training: ``Trainer`` (stages align / sft, checkpoints with exact resume, data parallel), the encoder-feature
cache, the collator, and builders that turn a resolved recipe (``compactvl.config``) into a model and datasets."""
from .collate import Collator, SampleBatch, collate, sample_turns
from .feature_cache import CacheView, FeatureCache, image_key, warm_cache
from .trainer import (TrainResult, Trainer, add_lora, build_dataset, build_model, build_train_data,
                      configure_trainable, list_checkpoints, load_checkpoint, loss_terms, lr_factor, merge_lora,
                      resolve_precision)

__all__ = ["CacheView", "Collator", "FeatureCache", "SampleBatch", "TrainResult", "Trainer", "add_lora",
           "build_dataset", "build_model", "build_train_data", "collate", "configure_trainable", "image_key",
           "list_checkpoints", "load_checkpoint", "loss_terms", "lr_factor", "merge_lora", "resolve_precision",
           "sample_turns", "warm_cache"]
