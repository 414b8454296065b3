"""Image, video and text encoders, and weight import from open_clip / timm / Hugging Face."""
from .attention import MultiHeadAttention
from .blocks import Block
from .convert import (
    image_encoder_from_open_clip,
    image_encoder_from_timm,
    video_encoder_from_hf_timesformer,
    video_encoder_from_image_encoder,
)
from .gating import HeadGate, HeadGateOutput
from .outputs import EncoderOutput
from .text import ClipTokenizer, TextEmbedding, get_tokenizer
from .video_vit import SpaceTimeBlock, VideoEncoder, VideoEncoderConfig
from .vit import ImageEncoder, ImageEncoderConfig

__all__ = [
    "Block",
    "ClipTokenizer",
    "EncoderOutput",
    "HeadGate",
    "HeadGateOutput",
    "ImageEncoder",
    "ImageEncoderConfig",
    "MultiHeadAttention",
    "SpaceTimeBlock",
    "TextEmbedding",
    "VideoEncoder",
    "VideoEncoderConfig",
    "get_tokenizer",
    "image_encoder_from_open_clip",
    "image_encoder_from_timm",
    "video_encoder_from_hf_timesformer",
    "video_encoder_from_image_encoder",
]

