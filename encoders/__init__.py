"""Image, video and text encoders, and weight import from open_clip / timm / Hugging Face.

Public names resolve lazily (PEP 562, :mod:`encoders.lazy`), so ``import encoders`` loads no torch.
"""
from __future__ import annotations

from encoders.lazy import lazy_exports

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "MultiHeadAttention": "encoders.attention",
    "Block": "encoders.blocks",
    "image_encoder_from_open_clip": "encoders.convert",
    "image_encoder_from_timm": "encoders.convert",
    "video_encoder_from_hf_timesformer": "encoders.convert",
    "video_encoder_from_image_encoder": "encoders.convert",
    "load_strict": "encoders.convert",
    "HeadGate": "encoders.gating",
    "HeadGateOutput": "encoders.gating",
    "EncoderOutput": "encoders.outputs",
    "ClipTokenizer": "encoders.text",
    "TextEmbedding": "encoders.text",
    "get_tokenizer": "encoders.text",
    "SpaceTimeBlock": "encoders.video_vit",
    "VideoEncoder": "encoders.video_vit",
    "VideoEncoderConfig": "encoders.video_vit",
    "ImageEncoder": "encoders.vit",
    "ImageEncoderConfig": "encoders.vit",
    "create_act": "encoders.activations",
    "act_fn": "encoders.activations",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
