"""ERNIE 4.5 VL's variable-resolution resampler, as an exact port and as an alignment projector.

Visual patch features (C) are merged 2 x 2 in space (4C) and passed through an MLP
(fc -> GELU -> fc -> LayerNorm), then merged over pairs of frames (8C -> 4C, same MLP shape; an
image is paired with itself), then mapped to the backbone width by a linear layer and an RMSNorm.
A video of T frames on an h x w patch grid becomes T/2 * h/2 * w/2 tokens, an image h/2 * w/2.

``VariableResolutionResampler.forward(tokens, grid_thw)`` takes transformers' packed layout
(all items' patches concatenated, each 2 x 2 block's four patches consecutive) and equals
``Ernie4_5_VLMoeVariableResolutionResamplerModel``; ``from_ernie45`` copies one.
``ErnieResamplerProjector`` wraps it as the ``"resampler_ernie45"`` aligner of an ErnieVL model:
it takes the encoder's (B, prefix + patches, C) tokens with their grid and frame count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MergeMLP(nn.Module):
    """fc1 -> GELU -> fc2 -> LayerNorm, (..., in_dim) -> (..., out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(F.gelu(self.fc1(x))))


class VariableResolutionResampler(nn.Module):
    """Spatial ``merge x merge`` and temporal ``temporal_merge`` token merging to ``out_dim``.

    in_dim: patch feature width C; out_dim: backbone width D.
    """

    def __init__(self, in_dim: int, out_dim: int, spatial_merge: int = 2, temporal_merge: int = 2,
                 ln_eps: float = 1e-6, rms_eps: float = 1e-5) -> None:
        super().__init__()
        if spatial_merge < 1 or temporal_merge < 1:
            raise ValueError(f"merge sizes must be >= 1, got spatial {spatial_merge}, temporal {temporal_merge}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.spatial_merge, self.temporal_merge = spatial_merge, temporal_merge
        spatial_dim = in_dim * spatial_merge**2
        self.spatial_mlp = MergeMLP(spatial_dim, spatial_dim, ln_eps)
        self.temporal_mlp = MergeMLP(spatial_dim * temporal_merge, spatial_dim, ln_eps)
        self.proj = nn.Linear(spatial_dim, out_dim)
        self.norm = nn.RMSNorm(out_dim, eps=rms_eps)

    def pair_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, M, S) spatially merged tokens -> (B, T/k * M, k*S): each block's features of k
        consecutive frames side by side (an image, T = 1, is repeated k times)."""
        b, t, m, s = x.shape
        k = self.temporal_merge
        if t == 1:
            return x.expand(b, k, m, s).permute(0, 2, 1, 3).reshape(b, m, k * s)
        if t % k:
            raise ValueError(f"a video needs a multiple of temporal_merge={k} frames, got {t}")
        return x.view(b, t // k, k, m, s).permute(0, 1, 3, 2, 4).reshape(b, (t // k) * m, k * s)

    def project(self, paired: torch.Tensor) -> torch.Tensor:
        """(..., k*S) -> (..., D): temporal MLP, linear, RMSNorm."""
        return self.norm(self.proj(self.temporal_mlp(paired)))

    def forward(self, tokens: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """transformers' layout: tokens (sum_i t_i*h_i*w_i, C), grid_thw (items, 3) -> (sum_i t'_i*h_i*w_i/m^2, D)."""
        m2 = self.spatial_merge**2
        if tokens.dim() != 2 or tokens.shape[1] != self.in_dim:
            raise ValueError(f"tokens must be (N, {self.in_dim}), got {tuple(tokens.shape)}")
        grid = torch.as_tensor(grid_thw).reshape(-1, 3).tolist()
        sizes = [t * h * w for t, h, w in grid]
        if sum(sizes) != tokens.shape[0] or any(h * w % m2 for _, h, w in grid):
            raise ValueError(f"grid_thw {grid} gives {sum(sizes)} patches (h*w divisible by {m2} each), "
                             f"but tokens has {tokens.shape[0]}")
        merged = self.spatial_mlp(tokens.reshape(-1, self.in_dim * m2))
        items = merged.split([n // m2 for n in sizes])
        paired = [self.pair_frames(x.view(1, t, h * w // m2, -1))[0] for x, (t, h, w) in zip(items, grid)]
        return self.project(torch.cat(paired))

    def merge_grid(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, T, gh, gw, C) patch grid -> (B, T/k * gh/m * gw/m, D), blocks row-major per frame pair."""
        b, t, gh, gw, c = patches.shape
        m = self.spatial_merge
        if gh % m or gw % m:
            raise ValueError(f"patch grid {gh}x{gw} is not divisible by spatial_merge={m}")
        blocks = patches.view(b, t, gh // m, m, gw // m, m, c).permute(0, 1, 2, 4, 3, 5, 6)
        merged = self.spatial_mlp(blocks.reshape(b, t, (gh // m) * (gw // m), m * m * c))
        return self.project(self.pair_frames(merged))

    @classmethod
    @torch.no_grad()
    def from_ernie45(cls, module: nn.Module) -> "VariableResolutionResampler":
        """Copy a transformers ``Ernie4_5_VLMoeVariableResolutionResamplerModel`` (same output)."""
        for name in ("spatial_linear", "temporal_linear", "mlp", "after_norm"):
            if not hasattr(module, name):
                raise TypeError(f"from_ernie45: expected an ERNIE 4.5 VL resampler with .{name}, "
                                f"got {type(module).__name__}")
        spatial, temporal = module.spatial_linear, module.temporal_linear
        in_dim, m = int(module.in_dim), int(module.spatial_merge_size)
        out = cls(in_dim, module.mlp.out_features, m, int(module.temporal_merge_size), spatial.ln.eps,
                  float(module.after_norm.variance_epsilon))
        out.to(device=module.mlp.weight.device, dtype=module.mlp.weight.dtype)
        for ours, theirs in ((out.spatial_mlp, spatial), (out.temporal_mlp, temporal)):
            ours.fc1.load_state_dict(theirs.fc1.state_dict())
            ours.fc2.load_state_dict(theirs.fc2.state_dict())
            ours.norm.load_state_dict(theirs.ln.state_dict())
        out.proj.load_state_dict(module.mlp.state_dict())
        out.norm.weight.copy_(module.after_norm.weight)
        return out


class ErnieResamplerProjector(nn.Module):
    """The ``"resampler_ernie45"`` aligner: (B, P + N, C) encoder tokens -> (B, P + N', D).

    The P class tokens pass through their own linear map (they stay the prefix for ``cls``
    pooling); the N patches (an image's gh x gw row-major, a video's by position then frame)
    go through :class:`VariableResolutionResampler`.
    """

    takes_layout = True  # forward needs the patch grid and frame count

    def __init__(self, in_dim: int, out_dim: int, spatial_merge: int = 2, temporal_merge: int = 2) -> None:
        super().__init__()
        self.prefix_proj = nn.Linear(in_dim, out_dim)
        self.resampler = VariableResolutionResampler(in_dim, out_dim, spatial_merge, temporal_merge)

    def forward(self, tokens: torch.Tensor, num_prefix: int, grid: tuple[int, int] | None = None,
                num_frames: int = 1) -> tuple[torch.Tensor, int]:
        if grid is None:
            raise ValueError("the resampler_ernie45 aligner needs the patch grid (gh, gw) of the encoder output")
        b, n, c = tokens.shape
        gh, gw = grid
        patches = tokens[:, num_prefix:]
        if patches.shape[1] != num_frames * gh * gw:
            raise ValueError(f"resampler_ernie45 needs all {num_frames}x{gh}x{gw} patch tokens after {num_prefix} "
                             f"prefix tokens, got {n} tokens (projector tokens='prefix' is not supported)")
        if num_frames == 1:
            grid_patches = patches.reshape(b, 1, gh, gw, c)
        else:  # video order: patch position major, frame minor
            grid_patches = patches.reshape(b, gh, gw, num_frames, c).permute(0, 3, 1, 2, 4)
        merged = self.resampler.merge_grid(grid_patches)
        return torch.cat([self.prefix_proj(tokens[:, :num_prefix]), merged], dim=1), num_prefix
