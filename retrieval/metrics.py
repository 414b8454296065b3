"""Recall@K for image-text retrieval in both directions (Flickr30K / COCO protocol)."""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_float_matrix(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    return x.detach().to(torch.float32, copy=False).cpu()


def recall_at_k(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: Union[Sequence[int], ArrayLike],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K both ways from embeddings, scored by inner product (pass L2-normalised features).

    image_emb (N, D), text_emb (T, D); ``text_to_image[j]`` is the image caption j describes.
    Text->image: caption j is a hit when its image is among the top k images.
    Image->text: image i is a hit when *any* of its captions is among the top k captions;
    images that have no caption are left out of that direction's denominator.
    Ties count in the query's favour (rank = number of strictly better candidates).
    Returns ``{"text_to_image_R@k": f, "image_to_text_R@k": f, ...}`` with fractions in [0, 1].
    """
    img = _as_float_matrix(image_emb, "image_emb")
    txt = _as_float_matrix(text_emb, "text_emb")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image_emb and text_emb differ in width: {img.shape[1]} vs {txt.shape[1]}")
    num_images, num_texts = img.shape[0], txt.shape[0]
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"need at least one image and one text, got {num_images} images, {num_texts} texts")
    t2i = torch.as_tensor(np.asarray(text_to_image), dtype=torch.int64).reshape(-1)
    if t2i.numel() != num_texts:
        raise ValueError(f"text_to_image has {t2i.numel()} entries but there are {num_texts} texts")
    if int(t2i.min()) < 0 or int(t2i.max()) >= num_images:
        raise ValueError(f"text_to_image values must lie in [0, {num_images - 1}], got range "
                         f"[{int(t2i.min())}, {int(t2i.max())}]")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")

    # text -> image: rank of the true image among all images.
    t2i_rank = torch.empty(num_texts, dtype=torch.int64)
    for start in range(0, num_texts, chunk_size):
        sims = txt[start:start + chunk_size] @ img.T                      # (c, N)
        true = sims.gather(1, t2i[start:start + chunk_size, None])        # (c, 1)
        t2i_rank[start:start + chunk_size] = (sims > true).sum(1)

    # image -> text: best rank among the image's captions.
    has_caption = torch.zeros(num_images, dtype=torch.bool)
    has_caption[t2i] = True
    i2t_rank = torch.empty(num_images, dtype=torch.int64)
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        sims = img[start:stop] @ txt.T                                    # (c, T)
        own = t2i[None, :] == torch.arange(start, stop)[:, None]          # (c, T)
        best_own = sims.masked_fill(~own, float("-inf")).amax(1, keepdim=True)
        i2t_rank[start:stop] = (sims > best_own).sum(1)

    i2t_valid = i2t_rank[has_caption]
    out: dict[str, float] = {}
    for k in ks:
        out[f"text_to_image_R@{k}"] = int((t2i_rank < k).sum()) / num_texts
    for k in ks:
        out[f"image_to_text_R@{k}"] = int((i2t_valid < k).sum()) / max(1, i2t_valid.numel())
    return out
