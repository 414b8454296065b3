"""Batch-level clip augmentation on tensors: temporal jitter, frame-rate jitter, mixup and cutmix.

These work on clips already in memory, so a training set decoded once (with more frames
than the model takes) still gets a new temporal view every step:

- :func:`temporal_indices`: for each clip pick ``num_frames`` of the ``available`` frames
  TSN-style (equal segments, a random frame of each: temporal jitter, strictly forward in time) over a random span of
  the clip (frame-rate jitter: a span fraction ``s`` in ``speed`` plays the action 1/s times
  slower, starting anywhere the span fits). Without jitter: segment centres of the whole clip.
- :func:`random_crop_boxes` / :func:`crop_resize`: a random resized crop per clip (the same box in
  every frame; optionally turned by an angle), batched with ``grid_sample``; an image batch is a batch of
  one-frame clips;
- :func:`mix_clips`: mixup (whole clips blended) or cutmix (one box pasted into every
  frame of a partner clip), with soft targets mixed by the same weight.

Randomness comes only from the explicit ``torch.Generator``.
"""
from __future__ import annotations

import math

import torch


def temporal_indices(available: int, num_frames: int, batch: int, generator: torch.Generator | None = None,
                     jitter: bool = True, speed: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """(batch, num_frames) int64 frame indices in [0, available); see the module docstring."""
    if available < 1 or num_frames < 1:
        raise ValueError(f"need available >= 1 and num_frames >= 1 frames, got {available} and {num_frames}")
    lo, hi = speed
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"speed (span fractions) must satisfy 0 < low <= high <= 1, got {speed!r}")
    u = torch.rand(3, batch, 1, generator=generator, dtype=torch.float64)
    span = (lo + (hi - lo) * u[0]) * available  # (B,1) frames covered
    start = (available - span) * u[1]
    seg = span / num_frames
    if not jitter:
        pos = start + (torch.arange(num_frames, dtype=torch.float64) + 0.5) * seg
        return pos.floor().long().clamp_(0, available - 1)
    # one whole frame from each segment's own frames [ceil(b_k), ceil(b_k+1)): the segments share no
    # frame, so a jittered clip runs strictly forward (never a repeated frame) whenever a segment spans
    # at least one frame; shorter segments fall back to the frame under a random point of the segment
    bounds = torch.ceil(start + torch.arange(num_frames + 1, dtype=torch.float64) * seg - 1e-9)
    lo, width = bounds[:, :-1], bounds[:, 1:] - bounds[:, :-1]
    u = torch.rand(batch, num_frames, generator=generator, dtype=torch.float64)
    whole = lo + (u * width).floor()
    point = (start + (torch.arange(num_frames, dtype=torch.float64) + u) * seg).floor()
    return torch.where(width >= 1, whole, point).long().clamp_(0, available - 1)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) int -> (B, num_classes) float32 one-hot targets."""
    return torch.nn.functional.one_hot(labels.long(), num_classes).float()


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator | None = None
               ) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a box covering about ``1 - lam`` of the frame, centred at a random point."""
    cut = math.sqrt(max(0.0, 1.0 - lam))
    bh, bw = int(round(height * cut)), int(round(width * cut))
    cy = int(torch.randint(height, (1,), generator=generator))
    cx = int(torch.randint(width, (1,), generator=generator))
    top, left = max(cy - bh // 2, 0), max(cx - bw // 2, 0)
    bottom, right = min(cy + (bh - bh // 2), height), min(cx + (bw - bw // 2), width)
    return top, left, bottom - top, right - left


def mix_clips(clips: torch.Tensor, targets: torch.Tensor, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or cutmix of a float batch (B,T,C,H,W) with its soft targets (B,K) -> (clips, targets, lam).

    Each clip is mixed with the clip ``B-1-i`` (the batch reversed). With both alphas > 0 the
    step picks one at random; ``lam`` is drawn from Beta(alpha, alpha); cutmix's ``lam`` is
    the uncovered share actually kept. Both alphas 0: the batch is returned unchanged (lam 1).
    """
    if clips.dim() != 5 or targets.dim() != 2 or clips.shape[0] != targets.shape[0]:
        raise ValueError(f"need clips (B,T,C,H,W) and targets (B,K) of one batch, got {tuple(clips.shape)} and "
                         f"{tuple(targets.shape)}")
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup/cutmix alphas must be >= 0, got {mixup_alpha} and {cutmix_alpha}")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return clips, targets, 1.0
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or bool(torch.rand((), generator=generator) < 0.5))
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    gamma = torch._standard_gamma(torch.full((2,), float(alpha), dtype=torch.float64), generator=generator)
    lam = float(gamma[0] / gamma.sum())
    partner = clips.flip(0)
    if use_cutmix:
        top, left, h, w = cutmix_box(clips.shape[-2], clips.shape[-1], lam, generator)
        mixed = clips.clone()
        mixed[..., top:top + h, left:left + w] = partner[..., top:top + h, left:left + w]
        lam = 1.0 - h * w / (clips.shape[-2] * clips.shape[-1])
    else:
        mixed = clips * lam + partner * (1.0 - lam)
    return mixed, targets * lam + targets.flip(0) * (1.0 - lam), lam


def random_crop_boxes(batch: int, min_area: float, generator: torch.Generator | None = None,
                      ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """(batch, 4) boxes (cx, cy, w, h) in [-1, 1] frame coordinates: area fraction in [min_area, 1], aspect in
    ``ratio``, inside the frame."""
    if not 0.0 < min_area <= 1.0:
        raise ValueError(f"min_area must be in (0, 1], got {min_area!r}")
    u = torch.rand(4, batch, generator=generator, dtype=torch.float64)
    area = min_area + (1.0 - min_area) * u[0]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1.0 - w) * (2 * u[2] - 1)
    cy = (1.0 - h) * (2 * u[3] - 1)
    return torch.stack([cx, cy, w, h], 1)


def crop_resize(clips: torch.Tensor, boxes: torch.Tensor, angles: torch.Tensor | None = None) -> torch.Tensor:
    """Each clip of float (B,T,C,H,W) cropped to its box (from :func:`random_crop_boxes`; the same box in every
    frame), turned by ``angles`` (B,) radians about the box centre when given (counter-clockwise on screen,
    in pixel space, so a non-square frame is not sheared), and resized back to H x W (bilinear; samples
    outside the frame repeat its border)."""
    b, t, c, h, w = clips.shape
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    sx, sy = boxes[:, 2].double(), boxes[:, 3].double()
    if angles is None:
        theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    else:
        # normalised coords n = D^-1 p with D = diag(W/2, H/2): n_in = D^-1 R D diag(sx, sy) n_out + centre
        cos, sin = torch.cos(angles.double()), torch.sin(angles.double())
        aspect = h / w
        theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy * aspect
        theta[:, 1, 0], theta[:, 1, 1] = sin * sx / aspect, cos * sy
    theta[:, 0, 2], theta[:, 1, 2] = boxes[:, 0].double(), boxes[:, 1].double()
    grid = torch.nn.functional.affine_grid(theta.to(clips.dtype), (b, c, h, w), align_corners=False)
    flat = clips.reshape(b, t * c, h, w)
    out = torch.nn.functional.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(b, t, c, h, w)
