"""Local attention in non-overlapping 2-D windows of patches (local→global layering).

Patches attend only to the patches of their own ``window_size`` x ``window_size``
window plus the class token(s); the class token(s) attend globally to every token,
so the summary still sees the whole image.

A grid that ``window_size`` does not tile is **padded** on the bottom/right to the
next multiple; the padded positions are masked out of every key set and dropped from
the output, so the result is the same as windows clipped at the border. Any input
size the patch grid allows therefore works.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

#: ``(q, k, v, attn_mask) -> out`` on (B, H, L, Dh) tensors, e.g. ``MultiHeadAttention.attend``.
MaskedAttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def padded_grid(grid: tuple[int, int], window_size: int) -> tuple[int, int]:
    """The grid rounded up to a multiple of ``window_size`` on each side."""
    gh, gw = grid
    return -(-gh // window_size) * window_size, -(-gw // window_size) * window_size


def partition_windows(x: torch.Tensor, grid: tuple[int, int], window_size: int) -> torch.Tensor:
    """(B, H, gh*gw, D) -> (B*nW, H, ws*ws, D), zero-padded to whole windows."""
    b, h, n, d = x.shape
    gh, gw = grid
    ph, pw = padded_grid(grid, window_size)
    x = x.reshape(b, h, gh, gw, d)
    if (ph, pw) != (gh, gw):
        x = F.pad(x, (0, 0, 0, pw - gw, 0, ph - gh))
    ws = window_size
    x = x.reshape(b, h, ph // ws, ws, pw // ws, ws, d).permute(0, 2, 4, 1, 3, 5, 6)
    return x.reshape(-1, h, ws * ws, d)


def merge_windows(x: torch.Tensor, batch: int, grid: tuple[int, int], window_size: int) -> torch.Tensor:
    """Inverse of ``partition_windows``: (B*nW, H, ws*ws, D) -> (B, H, gh*gw, D), padding dropped."""
    _, h, _, d = x.shape
    gh, gw = grid
    ph, pw = padded_grid(grid, window_size)
    ws = window_size
    x = x.reshape(batch, ph // ws, pw // ws, h, ws, ws, d).permute(0, 3, 1, 4, 2, 5, 6)
    x = x.reshape(batch, h, ph, pw, d)[:, :, :gh, :gw]
    return x.reshape(batch, h, gh * gw, d)


def window_key_mask(grid: tuple[int, int], window_size: int, num_prefix: int, device: torch.device) -> torch.Tensor | None:
    """(nW, 1, 1, num_prefix + ws*ws) bool, True where a key is real; None without padding."""
    if padded_grid(grid, window_size) == tuple(grid):
        return None
    gh, gw = grid
    valid = torch.ones(1, 1, gh * gw, 1, device=device)
    valid = partition_windows(valid, grid, window_size)[:, 0, :, 0] > 0.5  # (nW, ws*ws)
    prefix = torch.ones(valid.shape[0], num_prefix, dtype=torch.bool, device=device)
    return torch.cat([prefix, valid], dim=1)[:, None, None, :]


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    window_size: int,
    attend: MaskedAttendFn,
    num_prefix: int = 1,
) -> torch.Tensor:
    """Windowed self-attention on (B, H, P + gh*gw, Dh) q/k/v -> (B, H, P + gh*gw, Dh).

    The first ``num_prefix`` tokens (class tokens) attend to all tokens; each patch
    attends to the prefix tokens and the patches of its window.
    """
    b, h, n, d = q.shape
    gh, gw = grid
    if n != num_prefix + gh * gw:
        raise ValueError(f"sequence length {n} does not match {num_prefix} prefix tokens + grid {gh}x{gw}")
    prefix_out = attend(q[:, :, :num_prefix], k, v, None)
    qw = partition_windows(q[:, :, num_prefix:], grid, window_size)
    kw = partition_windows(k[:, :, num_prefix:], grid, window_size)
    vw = partition_windows(v[:, :, num_prefix:], grid, window_size)
    num_windows = qw.shape[0] // b
    kp = k[:, :, :num_prefix].repeat_interleave(num_windows, dim=0)
    vp = v[:, :, :num_prefix].repeat_interleave(num_windows, dim=0)
    mask = window_key_mask(grid, window_size, num_prefix, q.device)
    if mask is not None:
        mask = mask.repeat(b, 1, 1, 1)
    out = attend(qw, torch.cat([kp, kw], dim=2), torch.cat([vp, vw], dim=2), mask)
    return torch.cat([prefix_out, merge_windows(out, b, grid, window_size)], dim=2)


def window_attention_mask(grid: tuple[int, int], window_size: int, num_prefix: int = 1) -> torch.Tensor:
    """The same pattern as a dense (L, L) bool mask (True = may attend), for tests / eager use."""
    gh, gw = grid
    rows = torch.arange(gh).repeat_interleave(gw) // window_size
    cols = torch.arange(gw).repeat(gh) // window_size
    n = num_prefix + gh * gw
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:num_prefix, :] = True
    mask[:, :num_prefix] = True
    mask[num_prefix:, num_prefix:] = (rows[:, None] == rows[None, :]) & (cols[:, None] == cols[None, :])
    return mask
