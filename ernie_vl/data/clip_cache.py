"""The decoded-clip cache of ``CachedVideos``: uint8 tensors in a safetensors file, never a pickle.

A cache file is read back by the next run, so it holds data only: ``<key>.safetensors`` with the
tensors ``keep`` (int64, the kept item indices), ``clips`` (uint8 (N,T,3,S,S)) and ``labels``
(int64 (N,)), and a JSON header (safetensors metadata) naming the format, the key and a SHA-256
of the tensors' bytes. On load every part is checked (format, key, tensor names, dtypes, shapes,
checksum); a truncated, tampered or foreign file is reported by :class:`ClipCacheError` and
:func:`cached_clips` decodes again and replaces it. Written to a temporary name and renamed,
so a crash never leaves half a file.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

FORMAT = "ernie-vl-decoded-clips-v1"
TENSORS = {"keep": torch.int64, "clips": torch.uint8, "labels": torch.int64}


class ClipCacheError(ValueError):
    """A decoded-clip cache file that cannot be used; the message names the file and the reason."""


def _digest(value: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for name in sorted(TENSORS):
        t = value[name].contiguous()
        sha.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        sha.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return sha.hexdigest()


def save_clips(path: str | Path, value: dict[str, Any], key: str) -> Path:
    """Write ``value`` (keep, clips, labels) to ``path`` atomically; see the module docstring."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {"keep": torch.as_tensor(value["keep"], dtype=torch.int64),
               "clips": torch.as_tensor(value["clips"]), "labels": torch.as_tensor(value["labels"])}
    for name, dtype in TENSORS.items():
        if tensors[name].dtype != dtype:
            raise TypeError(f"decoded clips: {name!r} must be {dtype}, got {tensors[name].dtype}")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "key": key, "sha256": _digest(tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_clips(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    """(keep, clips, labels) from ``path``; ClipCacheError naming the file when any check fails."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if meta.get("format") != FORMAT:
                raise ClipCacheError(f"decoded-clip cache {str(path)!r}: format {meta.get('format')!r}, "
                                     f"expected {FORMAT!r}")
            if names != set(TENSORS):
                raise ClipCacheError(f"decoded-clip cache {str(path)!r} holds tensors {sorted(names)}, "
                                     f"expected {sorted(TENSORS)}")
            value = {name: f.get_tensor(name) for name in TENSORS}
    except ClipCacheError:
        raise
    except Exception as err:  # truncated, not a safetensors file, unreadable
        raise ClipCacheError(f"decoded-clip cache {str(path)!r} is unreadable: {type(err).__name__}: {err}") from err
    if meta.get("key") != key:
        raise ClipCacheError(f"decoded-clip cache {str(path)!r} was written for key {meta.get('key')!r}, not {key!r}")
    for name, dtype in TENSORS.items():
        if value[name].dtype != dtype:
            raise ClipCacheError(f"decoded-clip cache {str(path)!r}: {name!r} is {value[name].dtype}, expected {dtype}")
    n = value["keep"].shape[0]
    if value["clips"].ndim != 5 or value["clips"].shape[0] != n or tuple(value["labels"].shape) != (n,):
        raise ClipCacheError(f"decoded-clip cache {str(path)!r}: shapes keep {tuple(value['keep'].shape)}, clips "
                             f"{tuple(value['clips'].shape)}, labels {tuple(value['labels'].shape)} do not agree")
    if meta.get("sha256") != _digest(value):
        raise ClipCacheError(f"decoded-clip cache {str(path)!r}: checksum mismatch (the file was changed)")
    return value


def cached_clips(cache_dir: Optional[str | Path], key: Any, decode: Callable[[], dict]) -> dict:
    """``decode()`` once per distinct ``key`` (settings + file sizes/mtimes), kept in ``cache_dir``; see above."""
    if not cache_dir:
        return decode()
    from ernie_vl.data.image_cache import cache_key

    name = cache_key(key)
    path = Path(cache_dir).expanduser() / f"{name}.safetensors"
    if path.is_file():
        try:
            return load_clips(path, name)
        except ClipCacheError as err:
            warnings.warn(f"{err}; decoding again", stacklevel=2)
    value = decode()
    try:
        save_clips(path, value, name)
    except OSError as err:  # a read-only or full disk is no reason to fail training
        warnings.warn(f"decoded-clip cache {str(path)!r} not written ({err})", stacklevel=2)
    return value
