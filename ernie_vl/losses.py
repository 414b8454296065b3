"""Contrastive (CLIP InfoNCE, SigLIP sigmoid) and classification losses with per-sample values.

Every loss returns ``(loss, per_sample)``: the scalar to optimise and a (B_local,)
tensor for loss-priority sampling, with ``loss == per_sample.mean()``.

Distributed (open_clip's "local loss + gather with grad"): when ``torch.distributed``
is initialised with world size W > 1, each rank gathers the other side's features from
every rank *with gradients*, scores its B local samples against all W*B, and averages
over its local samples. The gather's backward sums the gradient contributions of every
rank, so with DDP's gradient averaging the update equals that of one process holding
the whole global batch.

Multi-positive targets (``groups``): rows of one group are positives of each other, e.g. clips of
one class and that class's prompts (ActionCLIP), or image-text pairs with identical captions
(:func:`caption_groups`, an opt-in: ``LossConfig.caption_positives``). For InfoNCE whose copies of a
caption embed alike the grouped and plain losses have the same gradients; for SigLIP the copies' cross
pairs turn from negatives into positives.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient from every rank and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.batch
        return grad[start : start + ctx.batch]


def distributed_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, E) local -> (W*B, E) from all ranks (rank-major), and the offset of this rank's rows.

    Every rank must pass the same B. Without a process group this returns ``(x, 0)``.
    """
    rank, world = distributed_world()
    if world == 1:
        return x, 0
    return _GatherWithGrad.apply(x), rank * x.shape[0]


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"{what}: features must be (B, E), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{what}: both sides need the same (B, E), got {tuple(a.shape)} and {tuple(b.shape)}")


def gather_groups(groups: torch.Tensor) -> torch.Tensor:
    """(B, ...) local rows (group ids, tokens) -> (W*B, ...) from all ranks (rank-major, no gradient);
    unchanged without a process group."""
    _, world = distributed_world()
    if world == 1:
        return groups
    parts = [torch.empty_like(groups) for _ in range(world)]
    dist.all_gather(parts, groups.contiguous())
    return torch.cat(parts)


_PRIME = 2_147_483_647  # 2**31 - 1: token ids and position weights below it, so no product overflows int64


def _row_keys(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) tokens -> (B, 2) int64 position-weighted sums mod a prime: equal rows give equal keys, and a
    trailing padding column (token 0) adds nothing, so the keys do not depend on the tensor's width."""
    pos = torch.arange(1, tokens.shape[1] + 1, device=tokens.device, dtype=torch.int64)
    t = tokens.long().remainder(_PRIME)
    weights = [(pos * mult + add) % _PRIME for mult, add in ((1_000_003, 7), (7_919, 104_729))]
    return torch.stack([(t * w).remainder(_PRIME).sum(dim=1) for w in weights], dim=1)


def caption_groups(tokens: torch.Tensor) -> torch.Tensor | None:
    """(B, L) int caption tokens -> (B,) group ids shared by identical captions across the global batch, or
    None when every caption of the global batch is unique (then the pair losses are exactly CLIP's / SigLIP's).

    Every rank gathers every rank's (B, 2) row keys; only when two keys agree (a repeat, or a key collision)
    are the tokens themselves gathered (zero-padded to the widest rank's L: padding is token 0, so a caption
    tokenised into a wider tensor is the same row) and the distinct rows numbered, alike on every rank, as
    :func:`positives` needs. Every rank must pass the same B."""
    if tokens.ndim != 2 or tokens.dtype.is_floating_point:
        raise ValueError(f"caption tokens must be (B, L) integers, got {tuple(tokens.shape)} {tokens.dtype}")
    keys = gather_groups(_row_keys(tokens))
    if torch.unique(keys, dim=0).shape[0] == keys.shape[0]:  # distinct keys: distinct captions
        return None
    rank, world = distributed_world()
    if world > 1:
        widths = gather_groups(torch.tensor([tokens.shape[1]], device=tokens.device))
        tokens = F.pad(tokens, (0, int(widths.max()) - tokens.shape[1]))
    _, ids, counts = torch.unique(gather_groups(tokens), dim=0, return_inverse=True, return_counts=True)
    if int(counts.max()) == 1:  # only a key collision
        return None
    return ids[rank * tokens.shape[0] : (rank + 1) * tokens.shape[0]]


def positives(a: torch.Tensor, n_all: int, offset: int, groups: torch.Tensor | None) -> torch.Tensor:
    """(B, W*B) bool: which candidates of the other side are positives of each local row.

    Without ``groups`` only the row's own partner (CLIP pairs). With ``groups`` (B,) int, every candidate
    of the same group: clips of one class paired with prompts of that class (ActionCLIP), where another
    clip's prompt of the same class is no negative."""
    rows = torch.arange(a.shape[0], device=a.device)
    if groups is None:
        mask = torch.zeros(a.shape[0], n_all, dtype=torch.bool, device=a.device)
        mask[rows, rows + offset] = True
        return mask
    if groups.shape != (a.shape[0],) or groups.dtype.is_floating_point:
        raise ValueError(f"groups must be ({a.shape[0]},) integer ids, got {tuple(groups.shape)} {groups.dtype}")
    return groups[:, None] == gather_groups(groups)[None, :]


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
              groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of paired, L2-normalised features a[i] <-> b[i].

    a, b: (B, E). Returns the mean loss and per-sample (B,) = (CE of row i of a->b +
    CE of row i of b->a) / 2, each over all W*B candidates of the other side. ``groups`` (B,) int:
    rows of one group are all positives of each other (the target spread evenly over them), e.g.
    clips and class prompts, where the same class recurs in a batch.
    """
    _check_pair(a, b, "clip_loss")
    all_a, offset = gather_with_grad(a)
    all_b, _ = gather_with_grad(b)
    logits_ab = logit_scale * a @ all_b.t()
    logits_ba = logit_scale * b @ all_a.t()
    if groups is None:
        labels = torch.arange(a.shape[0], device=a.device) + offset
    else:
        mask = positives(a, all_b.shape[0], offset, groups).to(logits_ab.dtype)
        labels = mask / mask.sum(dim=1, keepdim=True)
    per_sample = 0.5 * (
        F.cross_entropy(logits_ab, labels, reduction="none") + F.cross_entropy(logits_ba, labels, reduction="none")
    )
    return per_sample.mean(), per_sample


def siglip_loss(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP's pairwise sigmoid loss of paired, L2-normalised features.

    Every (i, j) is a binary problem, positive iff i == j: -log sigmoid(z_ij * (t a_i.b_j + bias)).
    Per-sample (B,) = (sum over row i of a vs all b + sum over row i of b vs all a) / 2,
    so that the mean over the global batch is SigLIP's sum over all pairs / batch size. ``groups``:
    as in :func:`clip_loss`, every pair within a group is positive.
    """
    _check_pair(a, b, "siglip_loss")
    all_a, offset = gather_with_grad(a)
    all_b, _ = gather_with_grad(b)
    signs = positives(a, all_b.shape[0], offset, groups).to(a.dtype) * 2.0 - 1.0
    row_ab = -F.logsigmoid(signs * (logit_scale * a @ all_b.t() + logit_bias)).sum(dim=1)
    row_ba = -F.logsigmoid(signs * (logit_scale * b @ all_a.t() + logit_bias)).sum(dim=1)
    per_sample = 0.5 * (row_ab + row_ba)
    return per_sample.mean(), per_sample


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy with label smoothing. logits (B, K); labels (B,) int in [0, K), or soft
    targets (B, K) float (class probabilities, e.g. from mixup / cutmix)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, num_classes), got {tuple(logits.shape)}")
    if labels.dtype.is_floating_point and labels.ndim == 2:
        if labels.shape != logits.shape:
            raise ValueError(f"soft targets must be {tuple(logits.shape)} like the logits, got {tuple(labels.shape)}")
        per_sample = F.cross_entropy(logits, labels.to(logits.dtype), reduction="none",
                                     label_smoothing=label_smoothing)
        return per_sample.mean(), per_sample
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be ({logits.shape[0]},) to match the logits, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    num_classes = logits.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].tolist()
        raise ValueError(f"labels {bad} out of range; valid: 0..{num_classes - 1}")
    per_sample = F.cross_entropy(logits, labels.long(), reduction="none", label_smoothing=label_smoothing)
    return per_sample.mean(), per_sample
