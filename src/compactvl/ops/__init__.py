"""Pre-LLM token ops (one method per module, each registered in ``compactvl.registry.TOKEN_OPS``).

Importing this package registers every op; build recipes with :func:`build_ops`.
"""
from . import (avgpool, bipartite_merge, cdpruner, cotr, divprune, fuse, holov, learnpruner, mbtf, mke,  # noqa: F401
               mmtok, pixel_shuffle, prumerge, qmop, random_keep, resampler, stf, visionzip, vispruner)
from .base import OpContext, StreamOp, TokenOp, TokenPipeline, build_ops

__all__ = ["OpContext", "StreamOp", "TokenOp", "TokenPipeline", "build_ops"]
