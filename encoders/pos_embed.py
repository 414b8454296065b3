"""Resampling of learned 2-D (spatial) and 1-D (temporal) position embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F

INTERP_MODES = ("bicubic", "bilinear", "nearest")
TEMPORAL_INTERP_MODES = ("linear", "nearest")
POS_INITS = ("normal", "sincos")


def sincos_pos_embed_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(gh*gw, dim) fixed 2-D sine-cosine position table (MAE / "Attention is all you need" per axis).

    The first half of the channels encodes the row, the second half the column, each as sin and cos
    of the position at ``dim // 4`` geometric frequencies; ``dim`` must be a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine table needs a width divisible by 4, got {dim}")
    gh, gw = grid
    quarter = dim // 4
    freqs = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows = torch.arange(gh, dtype=torch.float64)[:, None].expand(gh, gw).reshape(-1, 1) * freqs
    cols = torch.arange(gw, dtype=torch.float64)[None, :].expand(gh, gw).reshape(-1, 1) * freqs
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1).float()


def resample_pos_embed_2d(
    pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], mode: str = "bicubic"
) -> torch.Tensor:
    """(gh0*gw0, C) patch position embeddings -> (gh*gw, C) for another grid.

    ``mode`` is a ``F.interpolate`` mode; bicubic/bilinear anti-alias when shrinking.
    """
    if mode not in INTERP_MODES:
        raise ValueError(f"unknown position interpolation {mode!r}; valid: {', '.join(INTERP_MODES)}")
    if tuple(old_grid) == tuple(new_grid):
        return pos
    gh0, gw0 = old_grid
    c = pos.shape[-1]
    grid = pos.reshape(1, gh0, gw0, c).permute(0, 3, 1, 2)
    kwargs = {}
    if mode != "nearest":
        kwargs = dict(align_corners=False, antialias=new_grid[0] < gh0 or new_grid[1] < gw0)
    out = F.interpolate(grid.float(), size=tuple(new_grid), mode=mode, **kwargs).to(pos.dtype)
    return out.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], c)


def resample_temporal_embed(time: torch.Tensor, num_frames: int, mode: str = "linear") -> torch.Tensor:
    """(T0, C) temporal embeddings -> (T, C) for a clip of another length."""
    if mode not in TEMPORAL_INTERP_MODES:
        raise ValueError(
            f"unknown temporal interpolation {mode!r}; valid: {', '.join(TEMPORAL_INTERP_MODES)}"
        )
    if time.shape[0] == num_frames:
        return time
    kwargs = dict(align_corners=False) if mode == "linear" else {}
    out = F.interpolate(time.t()[None].float(), size=num_frames, mode=mode, **kwargs)
    return out[0].t().to(time.dtype)
