"""Batch embedding of image files and texts with any model that has ``encode_image`` / ``encode_text``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from retrieval.images import ImageLoadError, PathLike, load_image


@dataclass
class EmbedResult:
    """Embeddings of the readable files, in input order, and the files that were skipped.

    ``embeddings`` (N_ok, D) float32 L2-normalised; ``paths`` the N_ok embedded paths;
    ``positions`` their positions in the input list; ``failures`` ``(path, reason)`` per skipped file.
    """

    embeddings: np.ndarray
    paths: list[str]
    positions: list[int]
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_failed(self) -> int:
        return len(self.failures)


def resolve_preprocess(model: Any, preprocess: Optional[Callable] = None) -> Callable:
    """``preprocess`` when given, else ``model.preprocess``; TypeError when neither exists."""
    fn = preprocess if preprocess is not None else getattr(model, "preprocess", None)
    if fn is None or not callable(fn):
        raise TypeError("no image preprocess: pass preprocess=... (PIL.Image -> (3,H,W) tensor) "
                        "or use a model with a .preprocess attribute")
    return fn


def resolve_tokenizer(model: Any, tokenizer: Optional[Callable] = None) -> Callable:
    """``tokenizer`` when given, else ``model.tokenizer``; TypeError when neither exists."""
    fn = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if fn is None or not callable(fn):
        raise TypeError("no tokenizer: pass tokenizer=... (list[str] -> (B, L) int64) "
                        "or use a model with a .tokenizer attribute")
    return fn


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for parameter-free models)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class _PathsWithReasons(Dataset):
    """Item ``(tensor | None, position, reason | None)`` so failures survive DataLoader workers."""

    def __init__(self, paths: Sequence[PathLike], transform: Callable, opener: Callable = load_image) -> None:
        self.paths = [str(p) for p in paths]
        self.transform, self.opener = transform, opener

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Optional[torch.Tensor], int, Optional[str]]:
        try:
            return self.transform(self.opener(self.paths[i])), i, None
        except ImageLoadError as err:
            return None, i, err.reason
        except Exception as err:  # a transform failing on one odd file must not stop the job
            return None, i, f"{type(err).__name__}: {err}"


def _collate(items: list) -> tuple[Optional[torch.Tensor], list[int], list[tuple[int, str]]]:
    ok = [(t, i) for t, i, r in items if t is not None]
    failed = [(i, r) for t, i, r in items if t is None]
    images = torch.stack([t for t, _ in ok]) if ok else None
    return images, [i for _, i in ok], failed


@torch.inference_mode()
def encode_image_batch(model: Any, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """(B,3,H,W) -> (B,D) float32 on CPU, L2-normalised when ``normalize``."""
    feats = model.encode_image(images.to(model_device(model))).float()
    return (F.normalize(feats, dim=-1) if normalize else feats).cpu()


@torch.inference_mode()
def encode_text_batch(model: Any, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """(B,L) int64 -> (B,D) float32 on CPU, L2-normalised when ``normalize``."""
    feats = model.encode_text(tokens.to(model_device(model))).float()
    return (F.normalize(feats, dim=-1) if normalize else feats).cpu()


def embed_images(
    model: Any,
    paths: Sequence[PathLike],
    batch_size: int = 64,
    num_workers: int = 0,
    preprocess: Optional[Callable] = None,
    normalize: bool = True,
    progress: bool = True,
    opener: Callable[[str], Any] = load_image,
) -> EmbedResult:
    """Embed image files in batches (DataLoader with ``num_workers``); unreadable files are skipped.

    ``opener(name) -> PIL.Image`` reads one item (default :func:`load_image`; a picklable callable
    for other stores, e.g. tar shards). Returns an :class:`EmbedResult` whose ``embeddings`` are
    (N_ok, D) float32 in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    transform = resolve_preprocess(model, preprocess)
    dataset = _PathsWithReasons(paths, transform, opener)
    if hasattr(model, "eval"):
        model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate, persistent_workers=False)
    chunks: list[torch.Tensor] = []
    positions: list[int] = []
    failures: list[tuple[str, str]] = []
    bar = tqdm(total=len(dataset), desc="embedding images", unit="img", disable=not progress)
    for images, idx, failed in loader:
        if images is not None:
            chunks.append(encode_image_batch(model, images, normalize))
            positions.extend(idx)
        failures.extend((dataset.paths[i], reason) for i, reason in failed)
        bar.update(len(idx) + len(failed))
        if failures:
            bar.set_postfix(skipped=len(failures))
    bar.close()
    if chunks:
        emb = torch.cat(chunks).numpy().astype(np.float32, copy=False)
    else:
        emb = np.zeros((0, 0), np.float32)
    return EmbedResult(emb, [dataset.paths[i] for i in positions], positions, failures)


def embed_texts(
    model: Any,
    texts: Sequence[str] | str,
    batch_size: int = 256,
    tokenizer: Optional[Callable] = None,
    normalize: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """Embed strings -> (T, D) float32 (L2-normalised when ``normalize``)."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tok = resolve_tokenizer(model, tokenizer)
    if hasattr(model, "eval"):
        model.eval()
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embedding texts", disable=not progress):
        chunks.append(encode_text_batch(model, tok(texts[start:start + batch_size]), normalize))
    if not chunks:
        return np.zeros((0, 0), np.float32)
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)
