"""Checkpoints: a folder with ``config.json`` and ``model.safetensors`` (never a pickle).

``save_pretrained`` writes both files under temporary names and renames them into place.
The safetensors header carries a SHA-256 digest of every tensor (name, dtype, shape,
bytes), so a truncated or tampered file raises a ``ValueError`` that says so, instead of
a crash deep inside torch. Loading is strict: every missing, unexpected or mis-shaped key
is named. A model quantized with ``ernie_vl.quantize_int8`` is saved the same way (its
int8 weights and scales are ordinary tensors) and marked in the header, so
``from_pretrained`` rebuilds the quantized structure before loading.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from encoders.convert import load_strict
from ernie_vl.config import ErnieVLConfig

if TYPE_CHECKING:
    from ernie_vl.model import ErnieVL

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = "1"
#: header entries that save_pretrained writes itself
RESERVED_METADATA = ("format", "ernie_vl_format", "sha256", "quantization")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, raw bytes) of every tensor, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict as contiguous CPU tensors, none sharing storage (safetensors refuses shared)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor; cannot save it")
        t = value.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


@dataclass(frozen=True)
class SavedCheckpoint:
    """What ``save_pretrained`` wrote: the folder, the model id a load of it gets, the weights' digest and the
    header metadata (``quantization`` names the int8 scheme of a quantized model)."""

    directory: Path
    model_id: str
    sha256: str
    metadata: dict[str, str]


def check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """Extra header entries, checked: string keys and values, none of ``RESERVED_METADATA``."""
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"checkpoint metadata must map str to str, got {key!r}: {value!r}")
    taken = sorted(set(metadata) & set(RESERVED_METADATA))
    if taken:
        raise ValueError(f"checkpoint metadata keys {taken} are written by save_pretrained itself; "
                         f"reserved: {', '.join(RESERVED_METADATA)}")
    return metadata


def save_pretrained(model: "ErnieVL", directory: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> SavedCheckpoint:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

    ``metadata``: extra header entries (provenance such as ``trained_on``). The model is not changed: the id
    that ``from_pretrained`` will give it comes back in the result. A quantized model's scheme is read from its
    structure (``ernie_vl.quantize.quantization_scheme``) and recorded.
    """
    from ernie_vl.quantize import quantization_scheme

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _plain_state_dict(model)
    extra = check_metadata(metadata)
    metadata = {"format": "pt", "ernie_vl_format": FORMAT_VERSION, "sha256": tensors_digest(tensors), **extra}
    scheme = quantization_scheme(model)
    if scheme is not None:
        metadata["quantization"] = scheme
    config_text = json.dumps(model.cfg.to_dict(), indent=2, sort_keys=True) + "\n"
    tmp_weights = directory / f".{WEIGHTS_NAME}.tmp"
    tmp_config = directory / f".{CONFIG_NAME}.tmp"
    save_file(tensors, str(tmp_weights), metadata=metadata)
    tmp_config.write_text(config_text)
    os.replace(tmp_weights, directory / WEIGHTS_NAME)
    os.replace(tmp_config, directory / CONFIG_NAME)
    return SavedCheckpoint(directory, weights_model_id(model.cfg.name, metadata["sha256"]), metadata["sha256"],
                           metadata)


def weights_model_id(name: str, sha256: str) -> str:
    """A model id that follows the weights, not the folder: ``ernie-vl:<name>:sha256-<16 hex>``.

    Indexes record it, so moving or copying a checkpoint keeps its indexes usable
    while a retrained or quantized model is told apart.
    """
    return f"ernie-vl:{name}:sha256-{sha256[:16]}"


def read_config(directory: str | os.PathLike) -> ErnieVLConfig:
    """The ``ErnieVLConfig`` of a checkpoint folder (strict)."""
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(directory)!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; a checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a model config") from None
    return ErnieVLConfig.from_dict(data)


def read_header(path: Path) -> dict[str, Any]:
    """Parse the safetensors header, checking that the file is complete."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated ({size} bytes): not a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ValueError(f"{path} is truncated or corrupt: header of {header_len} bytes in a {size}-byte file")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt: its safetensors header is not a JSON object")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise ValueError(
            f"{path} is truncated or has extra bytes: expected {8 + header_len + end} bytes, found {size}"
        )
    return header


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint's safetensors file, verified against its digest."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; a checkpoint folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    header = read_header(path)
    metadata = header.get("__metadata__") or {}
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for malformed files
        raise ValueError(f"{path} is corrupt and cannot be read as safetensors: {err}") from None
    expected = metadata.get("sha256")
    if expected is None:
        raise ValueError(f"{path} has no sha256 in its header: not written by ernie_vl save_pretrained")
    if tensors_digest(tensors) != expected:
        raise ValueError(f"{path} has been modified or corrupted: its tensors do not match the recorded sha256")
    return tensors, metadata


def from_pretrained(cls: type["ErnieVL"], directory: str | os.PathLike, map_location: str | torch.device = "cpu",
                    max_params: int | None = None) -> "ErnieVL":
    """Build ``cls(config)`` and load the weights strictly; quantized checkpoints come back quantized.

    The config is validated and its parameter count checked (``ernie_vl.limits``) before the
    weights are read. ``model_id`` is computed from the weights' digest (verified against the
    tensors); a ``model_id`` stored in ``config.json`` is only compared: when it differs, a
    warning names both and the computed one is used.
    """
    cfg = read_config(directory)
    model = cls(cfg, max_params=max_params)  # validates the config and checks the budget before reading weights
    path = Path(directory) / WEIGHTS_NAME
    tensors, metadata = load_tensors(path)
    if metadata.get("quantization"):
        from ernie_vl.quantize import prepare_quantized

        model = prepare_quantized(model, metadata["quantization"])
    load_strict(model, tensors, source=str(path))
    # the loader finishes the model it built: its id from the verified weights, its provenance from the header
    model.model_id = weights_model_id(cfg.name, metadata["sha256"])
    model.checkpoint_metadata = {k: str(v) for k, v in metadata.items() if k not in RESERVED_METADATA}
    if cfg.model_id and cfg.model_id != model.model_id:
        warnings.warn(f"{directory}: config.json says model_id {cfg.model_id!r} but the weights give "
                      f"{model.model_id!r}; using the one computed from the weights", stacklevel=3)
    return model.to(map_location).eval()
