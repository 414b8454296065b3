"""Prepare a model for inference at a precision: ``fp32``, ``bf16`` (autocast) or ``int8``.

``at_precision(model, "bf16")`` wraps a bfloat16 copy of any model with ``encode_image`` /
``encode_text`` / ``encode_video`` (an ``ErnieVL`` or an open_clip model) so that those calls run
under ``torch.autocast(dtype=torch.bfloat16)`` on the model's device and return float32 (weights
cast once, not per call; autocast keeps norms, softmax and reductions in float32); on a CPU
this uses AVX512-BF16 / AMX where the CPU has them (``bf16_native()``) and is slower than fp32
where it has not. ``"int8"`` returns ``ernie_vl.quantize_int8(model)`` for an ``ErnieVL`` (or a
model already quantized) and torch's dynamic int8 quantization of the ``nn.Linear`` layers for
other models (open_clip). ``"fp32"`` returns the model unchanged. The CLI's ``index`` and
``serve`` take ``--precision`` and go through this one helper.
"""
from __future__ import annotations

import warnings
from typing import Any

PRECISIONS = ("fp32", "bf16", "int8")
ENCODE_METHODS = ("encode_image", "encode_text", "encode_video")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision


def bf16_native() -> bool:
    """True when this CPU computes bf16 products natively (AVX512-BF16 or AMX-BF16)."""
    from ernie_vl import runtime

    return runtime.has_isa("avx512_bf16") or runtime.has_isa("amx_bf16")


def _device_type(model: Any) -> str:
    try:
        return next(model.parameters()).device.type
    except StopIteration:
        return "cpu"


class AutocastModel:
    """``model`` whose ``encode_*`` calls run under autocast at ``dtype`` and return float32.

    Every other attribute (``preprocess``, ``tokenizer``, ``model_id``, ``parameters`` ...) is
    the wrapped model's; ``eval()`` returns the wrapper. ``encode_image(images (B, 3, H, W)) ->
    (B, D)`` float32, and likewise ``encode_text(tokens (B, L))``, ``encode_video(clips (B, T, 3, H, W))``.
    """

    def __init__(self, model: Any, dtype: Any = None) -> None:
        import torch

        self.model = model
        self.dtype = torch.bfloat16 if dtype is None else dtype

    def __getattr__(self, name: str) -> Any:
        if name == "model":  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def eval(self) -> "AutocastModel":
        self.model.eval()
        return self

    def _call(self, method: str, x: Any) -> Any:
        import torch

        with torch.autocast(device_type=_device_type(self.model), dtype=self.dtype):
            return getattr(self.model, method)(x).float()

    def encode_image(self, images: Any) -> Any:
        return self._call("encode_image", images)

    def encode_text(self, tokens: Any) -> Any:
        return self._call("encode_text", tokens)

    def encode_video(self, clips: Any) -> Any:
        return self._call("encode_video", clips)


def is_quantized(model: Any) -> bool:
    """True for a model with int8 layers (``quantize_int8``, or torch's dynamic quantization)."""
    from ernie_vl.quantize import quantization_scheme

    return quantization_scheme(model) is not None or any(
        type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


def at_precision(model: Any, precision: str) -> Any:
    """``model`` prepared for inference at ``precision`` (one of ``PRECISIONS``); see the module docstring.

    Raises ValueError for an unknown precision, and for bf16 / fp32 asked of an int8 model
    (its weights are int8 already).
    """
    import torch
    from torch import nn

    check_precision(precision)
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module with encode_image / encode_text, got {type(model).__name__}")
    if is_quantized(model):
        if precision != "int8":
            raise ValueError(f"this model is int8 (quantized checkpoint); precision {precision!r} needs its "
                             f"float checkpoint")
        return model
    if precision == "fp32":
        return model
    if precision == "bf16":
        import copy

        return AutocastModel(copy.deepcopy(model).to(torch.bfloat16).eval(), torch.bfloat16)
    from ernie_vl.model import ErnieVL
    from ernie_vl.quantize import quantize_int8

    if isinstance(model, ErnieVL):
        return quantize_int8(model)
    if _device_type(model) != "cpu":
        raise ValueError("int8 runs on the CPU only; load the model with device 'cpu'")
    with warnings.catch_warnings():  # torch.ao's dynamic quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8)
