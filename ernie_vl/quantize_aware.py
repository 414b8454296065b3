"""Quantization-aware fine-tuning (QAT) for the int8 model of :mod:`ernie_vl.quantize`.

``prepare_qat(model)`` turns, in place, every layer that ``quantize_int8`` makes int8 into a
fake-quant twin that computes in float what the int8 layer computes:

- weights: symmetric int8 with one scale per output channel (``quantize_weight``'s grid);
- activations (the input of each int8 GEMM): per call, per tensor, asymmetric, on the layer's grid
  (``quantize_activation``'s: u8 0..``act_qmax``, zero exactly representable). ``prepare_qat`` records the
  grid on each layer (``act_qmax``: 255 where the int8 engines run 8 bits on this CPU, else 127, from
  ``ernie_vl.int8_engines.layer_activation_qmax``, the function ``quantize_int8`` uses) and
  ``quantize_int8`` gives the converted layer the grid its fake-quant twin trained with;
- MoE experts: each expert's rows are quantized as one tensor, its hidden activations as another,
  as ``Int8Experts`` does (the layer runs its reference dispatch during QAT);
- the text token embedding: int8 rows (weights only, as ``Int8Embedding``).

Routers, LayerNorms, attention softmax and the backbone's modality table stay float32, as in
``quantize_int8``. Gradients pass the rounding unchanged (straight-through estimator), so the
float weights learn to sit well on the int8 grid. The fake-quant layers are subclasses of the
float ones (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``, the expert classes) holding the same
parameters, so an optimiser built before ``prepare_qat`` keeps working, ``quantize_int8`` converts
a prepared model directly, and ``strip_qat`` turns it back into the plain float model.

    prepare_qat(model); ...train a few hundred steps...; int8 = quantize_int8(strip_qat(model))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.activations import act_fn as activation_fn
from ernie_vl.int8_engines import ACT_QMAX_7BIT, activation_qparams, bits_to_qmax, layer_activation_qmax
from ernie_vl.moe import MoEFeedForward
from ernie_vl.moe.experts import MLPExperts, SwiGLUExperts
from ernie_vl.moe.router import Router

#: the 7-bit activation grid (u8 0..127), the default of ``fake_quant_activation``
ACT_QMAX = ACT_QMAX_7BIT
#: symmetric int8 weight levels (-127..127)
WEIGHT_QMAX = 127


def _straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward pass, the identity's gradient to ``x`` in the backward pass."""
    return x + (q - x).detach()


def fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    """(..., out, in) -> the same weights rounded to ``quantize_weight``'s per-row symmetric int8 grid."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=-1, keepdim=True) / WEIGHT_QMAX).clamp(min=1e-12)
    q = (torch.round(w / scale).clamp(-WEIGHT_QMAX, WEIGHT_QMAX) * scale).to(weight.dtype)
    return _straight_through(weight, q)


def fake_quant_activation(x: torch.Tensor, qmax: int = ACT_QMAX) -> torch.Tensor:
    """Any shape -> ``x`` rounded to ``quantize_activation``'s grid: one scale and zero point for the whole
    tensor from its min and max (0 included), ``qmax + 1`` levels (128: 7 bits, 256: 8 bits)."""
    if x.numel() == 0:
        return x
    xd = x.detach().float()
    lo, hi = torch.aminmax(xd)
    scale, zero_point = activation_qparams(float(lo), float(hi), qmax)
    q = (torch.clamp(torch.round(xd * (1.0 / scale)) + zero_point, 0, qmax) - zero_point) * scale
    return _straight_through(x, q.to(x.dtype))


def _grid(layer: nn.Module) -> int:
    """The activation grid ``prepare_qat`` recorded on ``layer`` (7 bits when none was)."""
    return getattr(layer, "act_qmax", ACT_QMAX)


class QATLinear(nn.Linear):
    """``nn.Linear`` whose input and weight are fake-quantized: ``(..., in) -> (..., out)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_activation(x, _grid(self)), fake_quant_weight(self.weight), self.bias)


class QATPatchEmbed(nn.Conv2d):
    """A patch-embedding ``nn.Conv2d`` (kernel = stride) with fake-quant input and weights, as
    ``Int8PatchEmbed``: ``(B, C, H, W) -> (B, out, H/ph, W/pw)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quant_weight(self.weight.reshape(self.out_channels, -1)).view_as(self.weight)
        return self._conv_forward(fake_quant_activation(x, _grid(self)), w, self.bias)


class QATEmbedding(nn.Embedding):
    """``nn.Embedding`` with int8 rows (fake-quant weights): ``(...) int64 -> (..., D)``."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, fake_quant_weight(self.weight), self.padding_idx)


class QATMLPExperts(MLPExperts):
    """MLP experts whose ``expert(x, e)`` fake-quantizes as ``Int8Experts`` (rows of one expert per tensor)."""

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        b1 = None if self.b1 is None else self.b1[e]
        b2 = None if self.b2 is None else self.b2[e]
        qmax = _grid(self)
        h = activation_fn(self.activation)(F.linear(fake_quant_activation(x, qmax), fake_quant_weight(self.w1[e]), b1))
        return F.linear(fake_quant_activation(h, qmax), fake_quant_weight(self.w2[e]), b2)


class QATSwiGLUExperts(SwiGLUExperts):
    """SwiGLU experts whose ``expert(x, e)`` fake-quantizes as ``Int8Experts``."""

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        qmax = _grid(self)
        g, u = F.linear(fake_quant_activation(x, qmax), fake_quant_weight(self.w_gate_up[e])).chunk(2, dim=-1)
        h = activation_fn(self.activation)(g) * u
        return F.linear(fake_quant_activation(h, qmax), fake_quant_weight(self.w_down[e]))


#: float class -> its fake-quant twin (exact classes only: a subclass may compute something else)
QAT_CLASSES: dict[type, type] = {nn.Linear: QATLinear, nn.Embedding: QATEmbedding,
                                 MLPExperts: QATMLPExperts, SwiGLUExperts: QATSwiGLUExperts}
FLOAT_CLASSES: dict[type, type] = {v: k for k, v in QAT_CLASSES.items()} | {QATPatchEmbed: nn.Conv2d}


def _is_patch_conv(conv: nn.Module) -> bool:
    from ernie_vl.quantize import Int8PatchEmbed

    return type(conv) is nn.Conv2d and Int8PatchEmbed.supports(conv)


def _convert(module: nn.Module, keep: set[int], qmax: int) -> int:
    """Swap, in place, the classes of the quantizable layers below ``module`` (not those in ``keep``),
    recording the activation grid ``qmax`` on each (``act_qmax``, which ``quantize_int8`` reads)."""
    swapped = 0
    for name, child in module.named_children():
        if id(child) in keep or isinstance(child, Router):
            continue
        if name == "patch_embed" and _is_patch_conv(child):
            child.__class__ = QATPatchEmbed
            child.act_qmax = qmax
            swapped += 1
            continue
        if type(child) in QAT_CLASSES:
            child.__class__ = QAT_CLASSES[type(child)]
            if not isinstance(child, QATEmbedding):  # an embedding has no activation to quantize
                child.act_qmax = qmax
            swapped += 1
        if isinstance(child, MoEFeedForward) and child.groups is None:
            child._qat_backend = child.backend  # the reference dispatch calls ``experts.expert`` per expert
            child.backend = "reference"
        swapped += _convert(child, keep, qmax)
    return swapped


def prepare_qat(model: nn.Module, activation_bits: int | None = None) -> nn.Module:
    """Make ``model`` (an ``ErnieVL``, in place) compute what ``quantize_int8(model)`` will; returns it.

    ``activation_bits``: 7 or 8; None: the grid the int8 engines run at on this CPU (``layer_activation_qmax``).
    Raises ``ValueError`` when the model has nothing to quantize or is already int8.
    """
    from ernie_vl.quantize import quantization_scheme

    if quantization_scheme(model) is not None:
        raise ValueError("prepare_qat needs a float model; this one is already int8")
    keep = set()
    modality_embed = getattr(getattr(model, "backbone", None), "modality_embed", None)
    if modality_embed is not None:
        keep.add(id(modality_embed))  # quantize_int8 keeps this tiny table float32
    if _convert(model, keep, layer_activation_qmax(bits_to_qmax(activation_bits))) == 0:
        raise ValueError(f"prepare_qat found no layer to quantize in {type(model).__name__}")
    return model


def is_qat(model: nn.Module) -> bool:
    """True when ``model`` holds fake-quant layers (``prepare_qat`` was applied)."""
    return any(type(m) in FLOAT_CLASSES for m in model.modules())


def strip_qat(model: nn.Module) -> nn.Module:
    """Undo ``prepare_qat`` in place (the same parameters in the plain float classes); returns ``model``.

    Each layer keeps the activation grid it was fine-tuned for (``act_qmax``): ``quantize_int8`` uses it."""
    for m in model.modules():
        if type(m) in FLOAT_CLASSES:
            m.__class__ = FLOAT_CLASSES[type(m)]
        if isinstance(m, MoEFeedForward) and hasattr(m, "_qat_backend"):
            m.backend = m._qat_backend
            del m._qat_backend
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """The int8 model (``quantize_int8``) of a QAT-prepared ``model``; ``model`` itself is left as it is."""
    import copy

    from ernie_vl.quantize import quantize_int8

    return quantize_int8(strip_qat(copy.deepcopy(model)), inplace=True)
