"""Vision encoders behind one contract (``base.VisionEncoder`` → ``EncoderOutput``), registered in
``compactvl.registry.ENCODERS``: ``hf_vit`` (CLIP / SigLIP / DINOv2) and ``efficientnet_lite``.
Real weights come from ``compactvl.sources.load_encoder``; ``tiny_encoder`` builds random ones for tests."""
from .base import EncoderOutput, VisionEncoder, build_encoder, load_encoder_dir
from .efficientnet_lite import EfficientNetLite
from .hf_vit import HFViTEncoder
from .tiny import tiny_encoder

__all__ = ["EncoderOutput", "VisionEncoder", "build_encoder", "load_encoder_dir", "EfficientNetLite", "HFViTEncoder",
           "tiny_encoder"]
