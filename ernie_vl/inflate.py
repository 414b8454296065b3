"""Image -> video transfer: start a model's video path from its trained image path (inflation).

``inflate_video_from_image(model)`` returns a new ``ErnieVL`` whose

- video encoder is the image encoder inflated in time (``encoders.convert.video_encoder_from_image_encoder``):
  spatial blocks copied, temporal attention with a zero output projection, zero time embedding,
  ``per_frame`` class tokens; with ``tubelet_size`` k > 1 the 2D patch kernel becomes the 3D one by
  *mean* inflation (kernel / k in each of the k frames, I3D's averaging), so the clip encoder is
  exactly the image encoder applied to each tubelet's mean frame, its pooled output the mean over
  time steps (the frame-mean model), and a still clip embeds exactly as its frame. Mean rather than
  central-frame inflation: every frame's pixels reach the first layer from step one, so motion can
  be learnt by the patch kernel without first waking dead time slices, and a still clip still
  equals the image. With head gating, a clip's gates are pooled over all its frames, so the
  equality with per-frame image gates holds for still clips (without gating, for every clip);
- video projector is a copy of the image projector (config and weights);
- backbone treats video tokens as it treats image tokens (the video modality embedding and
  residual gates copied from the image ones).

``video_encoder(clip).pooled`` of a still clip equals ``image_encoder(frame).pooled`` whatever the aligner.
``encode_video`` of a still clip equals ``encode_image`` of its frame where the aligner hands the backbone
every token of the image the same number of times, since attention weighs a token repeated uniformly as it
weighs one copy: ``tiny``'s query resampler attends over T' identical copies of each token of a clip of T'
time steps, so there the two are equal. ``resampler_ernie45`` (``ernie45-tiny``) does not: it merges
the patch tokens over pairs of time steps (T' / 2 copies; an image's single frame is paired with itself) but
passes the T' per-time-step class tokens through one by one, so the backbone attends to T' identical class
tokens where an image has one and weighs them more; a still clip's embedding then differs from its frame's (by
about 0.03 at most per coordinate on a random-init ``ernie45-tiny`` with 8 frames; with one class token kept it
is the image's again, ``tests/test_preset_ernie45_tiny.py``).

The spatial geometry (patch size, width, depth, heads, and the conv tokenizer's channels) comes from the
image encoder; the number of frames, tubelet size and attention mode, and the video stem's ``frame_diff``
and ``time_kernel``, are kept from the video encoder's configuration. Text, image path, backbone weights
and classifier are unchanged.

Conv tokenizers (``conv_stem``): an image encoder with one gives a video encoder with the same blocks
inflated in time (each 3x3 kernel in the centre time slice, the others zero; BatchNorm copied; frame
difference inputs at the pixels' weights by default, ``diff_init="pixels"``, TSN's start of its RGB-difference
network, so the stem sees motion from the first step; or at zero with ``diff_init="zero"``, which starts the
stem blind to motion: on the few-shot bench's clips that start failed to fit them, see
``bench/results/few_shot_video.md``), whatever stem the video
configuration had, so a still clip still embeds as its frame in eval mode (as above: in the encoder always, in
the model where the aligner allows it), with or without ``frame_diff`` and head gating.
For moving clips the stem's time strides subsample the frames: time step t reads frames t*k, t*k + s, ...
(s the product of the stem's time strides, k the tubelet size; ``tiny``'s three blocks with k = 4 read
frame t*k alone), see ``encoders.convert.video_encoder_from_image_encoder``. An image encoder without a
stem cannot become a video stem with blocks: :func:`inflation_problem` says so, and inflation refuses.
"""
from __future__ import annotations

import copy

import torch

from encoders.convert import DEFAULT_DIFF_INIT, video_encoder_from_image_encoder
from encoders.video_stem import ConvStemConfig
from ernie_vl.modality import IMAGE, VIDEO


def inflation_problem(cfg) -> str | None:
    """Why the video path of a model with config ``cfg`` (an ``ErnieVLConfig``) cannot be inflated from its
    image path, or None when it can: the image encoder has a conv tokenizer, or the video encoder has no
    stem with blocks (frame differences alone feed the linear embedding, their weights started as ``diff_init``
    says)."""
    image, video = cfg.image_encoder.conv_stem, cfg.video_encoder.conv_stem
    if isinstance(image, ConvStemConfig) or not video or (isinstance(video, ConvStemConfig) and not video.channels):
        return None
    return (f"the video encoder asks for conv_stem={video!r}, which the image encoder's linear patch embedding "
            "cannot be inflated into; keep the checkpoint's video path (--video-init keep), drop the video stem "
            "(conv_stem=0), or give the image encoder a conv tokenizer (image_encoder.conv_stem) to inflate from")


@torch.no_grad()
def inflate_video_from_image(model, cls_mode: str = "per_frame", diff_init: str = DEFAULT_DIFF_INIT):
    """A new ``ErnieVL``: ``model`` with its video path started from its image path (module docstring);
    ``diff_init`` starts the frame-difference inputs' weights at the pixels' (``"pixels"``, the default) or at
    ``"zero"`` (``encoders.convert.inflate_kernel``)."""
    from ernie_vl.model import ErnieVL

    cfg = copy.deepcopy(model.cfg)
    old = cfg.video_encoder
    problem = inflation_problem(cfg)
    if problem is not None:
        raise ValueError(problem)
    stem = old.conv_stem if isinstance(old.conv_stem, ConvStemConfig) else ConvStemConfig((1,))  # its defaults
    video_encoder = video_encoder_from_image_encoder(model.image_encoder, old.num_frames, old.attention, cls_mode,
                                                     old.tubelet_size, frame_diff=stem.frame_diff,
                                                     time_kernel=stem.time_kernel, diff_init=diff_init)
    cfg.video_encoder = video_encoder.cfg
    cfg.video_projector = copy.deepcopy(cfg.image_projector)
    new = ErnieVL(cfg).to(model.logits.log_scale.device)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(("video_encoder.", "video_projector."))}
    state.update({f"video_encoder.{k}": v for k, v in video_encoder.state_dict().items()})
    state.update({f"video_projector.{k}": v for k, v in model.image_projector.state_dict().items()})
    backbone = model.backbone
    if backbone.modality_embed is not None:
        table = backbone.modality_embed.weight.detach().clone()
        table[VIDEO] = table[IMAGE]
        state["backbone.modality_embed.weight"] = table
    for i, block in enumerate(backbone.blocks):
        gate = block.gate.detach().clone()
        gate[VIDEO] = gate[IMAGE]
        state[f"backbone.blocks.{i}.gate"] = gate
    new.load_state_dict(state, strict=True)
    for name in ("tokenizer", "preprocess", "class_names"):
        setattr(new, name, getattr(model, name))
    new.train(model.training)
    return new

