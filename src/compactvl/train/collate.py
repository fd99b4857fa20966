"""Moved to :mod:`compactvl.data.collate` (evaluation and the demo use it too); importable from here as before."""
from ..data.collate import Collator, SampleBatch, Turns, collate, sample_turns

__all__ = ["Collator", "SampleBatch", "Turns", "collate", "sample_turns"]
