"""Video decoding, frame sampling, clip transforms, datasets, classification pipeline.

Never imports ``ernie_vl``. Public names resolve lazily (PEP 562) so that the
decode worker process (``python -m video.worker``) starts without importing torch.
"""
from __future__ import annotations

from encoders.lazy import lazy_exports

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "VideoDecodeError": "video.errors",
    "VideoInfo": "video.probe",
    "probe_video": "video.probe",
    "open_video": "video.decode",
    "VideoReader": "video.decode",
    "DecodeService": "video.decode",
    "ProbeCache": "video.decode",
    "PacketDecoder": "video.packets",
    "available_backends": "video.backends",
    "SampledClip": "video.sampling",
    "UniformSampler": "video.sampling",
    "TSNSampler": "video.sampling",
    "DenseSampler": "video.sampling",
    "build_sampler": "video.sampling",
    "ClipTransform": "video.transforms",
    "ClipTransformConfig": "video.transforms",
    "build_clip_transform": "video.transforms",
    "VideoFolder": "video.datasets",
    "VideoCSV": "video.datasets",
    "VideoFailure": "video.datasets",
    "VideoClipDataset": "video.datasets",
    "collate_skip_none": "video.datasets",
    "ViewSpec": "video.views",
    "MultiViewDataset": "video.views",
    "parse_views": "video.views",
    "classify": "video.pipeline",
    "evaluate": "video.pipeline",
    "ClassifyResult": "video.pipeline",
    "EvalResult": "video.pipeline",
    "ZeroShotClassifier": "video.zeroshot",
    "DEFAULT_TEMPLATES": "video.zeroshot",
    "FrameMeanVideoModel": "video.zeroshot",
    "as_video_text_model": "video.zeroshot",
    "save_confusion_matrix": "video.plots",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
