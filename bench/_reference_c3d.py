"""A small reference learner for the few-shot motion bench: a 3D convnet of about 60k parameters.

It reads the same clips the toolkit trains on (the same folders, decoded by the same
``video_dataset`` at the same frame count and size), gets the same label-aware flips and
reversals (the data's ``augment.json`` through ``video.label_maps``), and trains with plain
Adam for a fixed number of steps. It answers one question: what is reachable on these clips
with so few labels. If it scores far above ``tiny``, the toolkit's video path loses the signal.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn


class TinyC3D(nn.Module):
    """(B,T,3,H,W) float -> (B,K) logits: three 3x3x3 conv blocks, global average pooling, a linear head."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv3d(3, w, 3, padding=1), nn.BatchNorm3d(w), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
            nn.Conv3d(w, 2 * w, 3, padding=1), nn.BatchNorm3d(2 * w), nn.ReLU(), nn.MaxPool3d(2),
            nn.Conv3d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm3d(4 * w), nn.ReLU(), nn.AdaptiveAvgPool3d(1))
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(clips.transpose(1, 2)).flatten(1))


def _load(root: Path, num_frames: int, size: int, classes=None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from ernie_vl.data.sources import video_dataset

    ds = video_dataset(root, num_frames, size, (0.5,) * 3, (0.5,) * 3, train=False, classes=classes)
    clips, labels = zip(*(ds[i][:2] for i in range(len(ds))))
    return torch.stack(clips), torch.tensor(labels), list(ds.classes)


class EncoderClassifier(nn.Module):
    """(B,T,3,H,W) -> (B,K): the toolkit's bare ``encoders.VideoEncoder`` (pooled output) and a linear head,
    trained alone with the reference's loop: the encoder without the rest of the model around it."""

    def __init__(self, num_classes: int, **video_cfg) -> None:
        super().__init__()
        from encoders.video_vit import VideoEncoder, VideoEncoderConfig

        self.encoder = VideoEncoder(VideoEncoderConfig(**video_cfg))
        self.head = nn.Linear(self.encoder.cfg.embed_dim or self.encoder.cfg.width, num_classes)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(clips).pooled)


def train_reference(train_root: str | Path, val_root: str | Path, steps: int = 600, seed: int = 0,
                    num_frames: int = 8, size: int = 32, batch: int = 32, augment: bool = True,
                    video_cfg: dict | None = None, lr: float = 3e-3, weight_decay: float = 1e-2) -> dict:
    """Train :class:`TinyC3D` (or, given ``video_cfg``, :class:`EncoderClassifier`) on ``train_root`` for
    ``steps`` and return its held-out top-1 and timings."""
    from video.label_maps import apply_plan, load_label_maps

    torch.manual_seed(seed)
    x, y, classes = _load(Path(train_root), num_frames, size)
    vx, vy, _ = _load(Path(val_root), num_frames, size, classes)
    maps = load_label_maps(train_root) if augment else None
    plan = maps.resolve(classes) if maps is not None else None
    model = TinyC3D(len(classes)) if video_cfg is None else EncoderClassifier(len(classes), **video_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        ids = torch.randint(len(y), (batch,), generator=g)
        clips, labels = x[ids], y[ids]
        if plan is not None:
            flip, reverse, labels = plan.plan(labels, g)
            clips = apply_plan(clips, flip, reverse)
        loss = nn.functional.cross_entropy(model(clips), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(vx[i:i + 64]).argmax(1) for i in range(0, len(vy), 64)])
    return {"top1": float((pred == vy).float().mean()), "steps": steps, "train_s": round(train_s, 1),
            "params": sum(p.numel() for p in model.parameters())}
