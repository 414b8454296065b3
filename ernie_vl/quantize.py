"""Int8 inference on CPU: dynamic quantization of every linear layer, MoE experts included.

``quantize_int8(model)`` returns a copy of an ``ErnieVL`` in which
- every ``nn.Linear`` (encoder attention ``qkv`` / ``proj``, projectors, resampler, backbone
  attention and dense MLPs, heads, classifier) becomes ``Int8Linear``;
- every encoder MLP becomes ``Int8Mlp`` (its GELU fused into the first GEMM where the kernel can);
- every patch-embedding convolution (kernel = stride) becomes ``Int8PatchEmbed``, an int8 GEMM
  over the flattened patches;
- every MoE layer becomes ``Int8MoEFeedForward``: the router stays float32 (routing decisions
  are not quantized), each expert's two matrices are int8;
- the text token embedding becomes ``Int8Embedding`` (per-row scales).
Weights are int8 with one float32 scale per output channel (symmetric). Activations are
quantized per call, per tensor, to 7 bits (``quantize_activation``). Two GEMM kernels
(``INT8_KERNELS``), chosen per call by ``int8_kernel``: oneDNN's ``qlinear_pointwise`` (bias and
activation fused) or fbgemm's ``quantized::linear_dynamic``. ``auto`` (the default) times both once
per GEMM shape and thread count on the running CPU (``probe_int8_kernels``: which one wins depends
on the CPU's ISA, VNNI / AMX or not, and on the shape) and keeps the faster; calls of varying row
counts (the MoE experts) use fbgemm, since oneDNN builds a primitive per new row count.
``set_int8_kernel`` forces one. ``torch._int_mm`` was ~100x slower on an AVX2 CPU and torchao is
not installed. Attention softmax / SDPA, LayerNorms and residual adds stay float32.

The int8 weights and scales are plain buffers, so ``save_pretrained`` writes them to
safetensors like any tensor (the header records the scheme, ``SCHEMES``) and
``ErnieVL.from_pretrained`` returns the quantized model. Inference only: the quantized MoE
reports routing statistics but zero auxiliary losses, and nothing has gradients.
"""
from __future__ import annotations

import copy
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from encoders.activations import act_fn as activation_fn, act_name
from encoders.blocks import Mlp
from ernie_vl.moe import MoEFeedForward, MoEOutput
from ernie_vl.moe.stats import compute_routing_stats

#: checkpoint schemes this version reads; v2 (the default) also quantizes the patch convolutions
SCHEMES = ("int8-dynamic-per-channel-v1", "int8-dynamic-per-channel-v2")
SCHEME = SCHEMES[-1]


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out, in) float -> int8 of the same shape and (..., out) float32 scales (symmetric, per row)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


#: int8 GEMM kernels: oneDNN's ``qlinear_pointwise`` (fuses the bias and the activation into the
#: GEMM; builds a primitive per new input shape) and fbgemm's ``quantized::linear_dynamic``.
INT8_KERNELS = ("onednn", "fbgemm")
#: ``auto``: per GEMM shape (rows, in, out, threads) the kernel a one-time probe measured faster
#: (``probe_int8_kernels``, cached per process); fbgemm for varying row counts (the MoE experts)
KERNEL_CHOICES = ("auto",) + INT8_KERNELS

#: activations oneDNN applies inside the GEMM: name -> (post op, algorithm)
ONEDNN_POST_OPS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "silu": ("swish", ""),
                   "relu": ("relu", "")}


def available_int8_kernels() -> tuple[str, ...]:
    """The kernels of ``INT8_KERNELS`` this PyTorch build runs."""
    engines = torch.backends.quantized.supported_engines
    found = []
    if "onednn" in engines and hasattr(torch.ops.onednn, "qlinear_pointwise"):
        found.append("onednn")
    if "fbgemm" in engines or "x86" in engines:
        found.append("fbgemm")
    return tuple(found)


_choice: list[str] = ["auto"]


def int8_kernel_choice() -> str:
    """The selected kernel policy: one of ``KERNEL_CHOICES``."""
    return _choice[0]


def set_int8_kernel(name: str) -> str:
    """Select the int8 GEMM kernel policy for every int8 layer; returns the previous one."""
    if name not in KERNEL_CHOICES or (name != "auto" and name not in available_int8_kernels()):
        raise ValueError(f"unknown or unavailable int8 kernel {name!r}; valid here: auto, "
                         f"{', '.join(available_int8_kernels()) or '(none available)'}")
    previous, _choice[0] = _choice[0], name
    return previous


#: (kernel, rows, in_features, out_features) -> seconds of one call; replaceable for tests
ProbeFn = Callable[[str, int, int, int], float]
_probe: list[ProbeFn | None] = [None]
_probed: dict[tuple[int, int, int, int], str] = {}


def set_int8_probe(fn: ProbeFn | None) -> ProbeFn | None:
    """Replace the timing probe of ``auto`` (None: the real one) and clear its cache; returns the previous."""
    previous, _probe[0] = _probe[0], fn
    _probed.clear()
    return previous


def probed_int8_kernels() -> dict[tuple[int, int, int, int], str]:
    """The cached ``auto`` choices: (rows, in_features, out_features, threads) -> kernel."""
    return dict(_probed)


#: bytes of int8 weights the probe cycles through, so each call reads its weight from beyond the
#: L2 cache as a model's layers do (a single hot weight favoured oneDNN several-fold over what a model saw)
PROBE_WEIGHT_BYTES = 16 << 20


def time_int8_kernel(kernel: str, rows: int, in_features: int, out_features: int, reps: int = 3) -> float:
    """Median seconds of one int8 GEMM of this shape with ``kernel`` (after one warm-up call per weight),
    cycling through enough weight copies (``PROBE_WEIGHT_BYTES``, at most 8) that none stays in cache."""
    g = torch.Generator().manual_seed(0)
    copies = min(8, max(1, -(-PROBE_WEIGHT_BYTES // (in_features * out_features))))
    packs = [prepack(torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=g),
                     torch.full((out_features,), 1e-3), torch.zeros(out_features), kernel) for _ in range(copies)]
    x = torch.randn(rows, in_features, generator=g)
    seconds = []
    with torch.inference_mode():
        for packed in packs:  # warm-up: builds each primitive
            int8_linear(x, packed, kernel)
        for _ in range(reps):
            start = time.perf_counter()
            for packed in packs:
                int8_linear(x, packed, kernel)
            seconds.append((time.perf_counter() - start) / copies)
    return sorted(seconds)[len(seconds) // 2]


def probe_int8_kernels(rows: int, in_features: int, out_features: int) -> str:
    """The faster kernel for this GEMM shape at the current thread count, measured once and cached."""
    key = (rows, in_features, out_features, torch.get_num_threads())
    if key not in _probed:
        probe = _probe[0] or time_int8_kernel
        seconds = {k: probe(k, rows, in_features, out_features) for k in available_int8_kernels()}
        _probed[key] = min(seconds, key=seconds.get)
    return _probed[key]


def int8_kernel(rows: int | None = None, in_features: int | None = None, out_features: int | None = None) -> str:
    """The kernel for a call of ``rows`` x ``in_features`` -> ``out_features`` (rows None: a varying count,
    as the MoE experts'; then fbgemm, since oneDNN builds a primitive per new row count)."""
    available = available_int8_kernels()
    if not available:
        raise RuntimeError(f"int8 needs the onednn or fbgemm quantized engine; this build has "
                           f"{torch.backends.quantized.supported_engines}")
    choice = _choice[0]
    if choice != "auto":
        return choice
    if len(available) == 1:
        return available[0]
    if rows is None or in_features is None or out_features is None:
        return "fbgemm"
    return probe_int8_kernels(rows, in_features, out_features)


def prepack(weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, kernel: str):
    """Packed weights of one (out, in) int8 matrix with per-row scales for ``kernel``."""
    weight_int8, scale = weight_int8.cpu().contiguous(), scale.float().cpu().contiguous()
    bias = None if bias is None else bias.float().cpu().contiguous()
    if kernel == "onednn":
        zero_points = torch.zeros(weight_int8.shape[0], dtype=torch.long)
        return torch.ops.onednn.qlinear_prepack(weight_int8, None), scale, zero_points, bias
    zero_points = torch.zeros(weight_int8.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao (not installed)
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(weight_int8, scale.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(qweight, bias)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(M, K) float -> (uint8 (M, K) in [0, 127], scale, zero point): per-tensor, asymmetric, 7 bits.

    One min/max pass and one quantize pass; the uint8 tensor shares the quantized tensor's
    storage (no ``int_repr`` copy).
    """
    lo, hi = torch.aminmax(x)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)  # 0 must be exact (zero padding, ReLU)
    scale = (hi - lo) / 127.0 if hi > lo else 1.0
    zero_point = min(max(int(round(-lo / scale)), 0), 127)
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao (not installed)
        warnings.simplefilter("ignore", UserWarning)
        qx = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    data = torch.empty(0, dtype=torch.uint8).set_(qx.untyped_storage(), qx.storage_offset(), qx.shape, qx.stride())
    return data, scale, zero_point


def int8_linear(x: torch.Tensor, packed, kernel: str, activation: str | None = None) -> torch.Tensor:
    """(..., in) float -> activation((..., out)) through the int8 GEMM of ``kernel``.

    Activations are quantized per call, per tensor, to 7 bits (u8 0..127, as fbgemm's
    ``reduce_range``: without VNNI the u8 x s8 pair sums of the AVX2 kernels saturate 16 bits
    at full range). ``activation``: None, or a name of ``encoders.activations``;
    oneDNN fuses those in ``ONEDNN_POST_OPS`` into the GEMM.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    if kernel == "onednn":
        weight, scale, zero_points, bias = packed
        qx, x_scale, x_zero_point = quantize_activation(x2)
        post_op, algorithm = ONEDNN_POST_OPS.get(activation, ("none", ""))
        y = torch.ops.onednn.qlinear_pointwise(qx, x_scale, x_zero_point, weight, scale,
                                               zero_points, bias, 1.0, 0, torch.float32, post_op, [], algorithm)
        if activation is not None and activation not in ONEDNN_POST_OPS:
            y = activation_fn(activation)(y)
    else:
        y = torch.ops.quantized.linear_dynamic(x2, packed, True)
        if activation is not None:
            y = activation_fn(activation)(y)
    return y.reshape(*lead, y.shape[-1])


class _Packed(nn.Module):
    """Base: keeps packed weights per kernel, built lazily from the int8 buffers, rebuilt after loading."""

    def __init__(self) -> None:
        super().__init__()
        self._packed: dict[str, object] = {}

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = {}

    def _apply(self, fn, recurse: bool = True):  # .to() / .cpu(): repack from the moved buffers
        self._packed = {}
        return super()._apply(fn, recurse)

    def packed(self, rows: int | None = None, shape: tuple[int, int] | None = None) -> tuple[object, str]:
        """(packed weights, kernel) for a call of ``rows`` rows (None: varying) through a GEMM of
        ``shape`` (in, out); see ``int8_kernel``."""
        kernel = int8_kernel(rows, *(shape or (None, None)))
        if kernel not in self._packed:
            self._packed[kernel] = self._pack(kernel)
        return self._packed[kernel], kernel

    def _pack(self, kernel: str) -> object:
        raise NotImplementedError


class Int8Linear(_Packed):
    """Drop-in for ``nn.Linear`` at inference: int8 weight (out, in), scales (out,), float bias.

    ``forward(x (..., in), activation=None) -> (..., out)``; ``activation`` (an
    ``activation_fn`` name) is applied to the output, fused into the GEMM where the kernel can.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q, scale = quantize_weight(linear.weight)
        layer.weight_int8.copy_(q)
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def _pack(self, kernel: str) -> object:
        return prepack(self.weight_int8, self.weight_scale, self.bias, kernel)

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        packed, kernel = self.packed(x.numel() // max(x.shape[-1], 1), (self.in_features, self.out_features))
        return int8_linear(x, packed, kernel, activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def activation_name(act: nn.Module) -> str | None:
    """The ``encoders.activations`` name of an activation module (None: not in the registry)."""
    try:
        return act_name(act)
    except ValueError:
        return None


class Int8Mlp(nn.Module):
    """Drop-in for ``encoders.blocks.Mlp``: int8 ``fc1`` with its activation fused, then int8 ``fc2``."""

    def __init__(self, mlp: Mlp) -> None:
        super().__init__()
        name = activation_name(mlp.act)
        if name is None:
            raise TypeError(f"no int8 MLP for activation {type(mlp.act).__name__}")
        self.activation = name
        self.fc1 = Int8Linear.from_linear(mlp.fc1)
        self.fc2 = Int8Linear.from_linear(mlp.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x, self.activation))


class Int8PatchEmbed(_Packed):
    """Drop-in for a patch-embedding ``nn.Conv2d`` (kernel = stride, no padding): int8 GEMM over patches.

    ``forward(images (B, C, H, W)) -> (B, out, H/ph, W/pw)`` (a channels-last view: flattening
    the grid and transposing, as ``embed_patches`` does, gives contiguous tokens for free).
    Weight (out, C*ph*pw) int8 in the conv's (C, ph, pw) order, scales (out,), optional bias.
    """

    def __init__(self, in_chans: int, out_chans: int, patch: tuple[int, int], bias: bool) -> None:
        super().__init__()
        self.in_chans, self.out_chans, self.patch = in_chans, out_chans, tuple(patch)
        k = in_chans * patch[0] * patch[1]
        self.register_buffer("weight_int8", torch.zeros(out_chans, k, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_chans))
        self.register_buffer("bias", torch.zeros(out_chans) if bias else None)

    @staticmethod
    def supports(conv: nn.Conv2d) -> bool:
        return (tuple(conv.kernel_size) == tuple(conv.stride) and tuple(conv.padding) == (0, 0)
                and tuple(conv.dilation) == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "Int8PatchEmbed":
        if not cls.supports(conv):
            raise ValueError(f"Int8PatchEmbed needs kernel == stride, no padding / dilation / groups, got {conv}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias is not None)
        q, scale = quantize_weight(conv.weight.reshape(conv.out_channels, -1))
        layer.weight_int8.copy_(q)
        layer.weight_scale.copy_(scale)
        if conv.bias is not None:
            layer.bias.copy_(conv.bias.detach())
        return layer

    def _pack(self, kernel: str) -> object:
        return prepack(self.weight_int8, self.weight_scale, self.bias, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ph, pw = self.patch
        if c != self.in_chans or h % ph or w % pw:
            raise ValueError(f"expected (B, {self.in_chans}, H, W) with H, W multiples of {self.patch}, "
                             f"got {tuple(x.shape)}")
        gh, gw = h // ph, w // pw
        patches = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * ph * pw)
        packed, kernel = self.packed(patches.shape[0], (patches.shape[1], self.out_chans))
        return int8_linear(patches, packed, kernel).view(b, gh, gw, self.out_chans).permute(0, 3, 1, 2)


class Int8Embedding(nn.Module):
    """Drop-in for ``nn.Embedding``: int8 rows with one float32 scale per row."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "Int8Embedding":
        layer = cls(emb.num_embeddings, emb.embedding_dim)
        q, scale = quantize_weight(emb.weight)
        layer.weight_int8.copy_(q)
        layer.weight_scale.copy_(scale)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_int8).float() * self.weight_scale[ids][..., None]


class Int8Experts(_Packed):
    """E experts with int8 matrices: ``mlp`` (fc -> act -> proj, biases) or ``swiglu``.

    ``w_in_int8`` (E, H_in, D) is fc (or [gate; up], H_in = 2H), ``w_out_int8`` (E, D, H).
    ``forward(xs (M, D) sorted by expert, counts)`` -> (M, D).
    """

    def __init__(self, kind: str, activation: str, num_experts: int, d_model: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.kind, self.activation = kind, activation
        self.num_experts, self.d_model, self.hidden = num_experts, d_model, hidden
        h_in = 2 * hidden if kind == "swiglu" else hidden
        self.register_buffer("w_in_int8", torch.zeros(num_experts, h_in, d_model, dtype=torch.int8))
        self.register_buffer("w_in_scale", torch.ones(num_experts, h_in))
        self.register_buffer("w_out_int8", torch.zeros(num_experts, d_model, hidden, dtype=torch.int8))
        self.register_buffer("w_out_scale", torch.ones(num_experts, d_model))
        self.register_buffer("b_in", torch.zeros(num_experts, h_in) if bias else None)
        self.register_buffer("b_out", torch.zeros(num_experts, d_model) if bias else None)

    @classmethod
    def from_experts(cls, experts: nn.Module) -> "Int8Experts":
        if hasattr(experts, "w_gate_up"):
            w_in, w_out, b_in, b_out, kind = experts.w_gate_up, experts.w_down, None, None, "swiglu"
        elif hasattr(experts, "w1"):
            w_in, w_out, b_in, b_out, kind = experts.w1, experts.w2, experts.b1, experts.b2, "mlp"
        else:
            raise TypeError(f"cannot quantize experts of type {type(experts).__name__}")
        layer = cls(kind, experts.activation, experts.num_experts, experts.d_model, experts.hidden, b_in is not None)
        for name, w in (("w_in", w_in), ("w_out", w_out)):
            q, scale = quantize_weight(w)
            getattr(layer, f"{name}_int8").copy_(q)
            getattr(layer, f"{name}_scale").copy_(scale)
        if b_in is not None:
            layer.b_in.copy_(b_in.detach())
            layer.b_out.copy_(b_out.detach())
        return layer

    def params_per_expert(self) -> int:
        if self.kind == "swiglu":
            return 3 * self.d_model * self.hidden
        return 2 * self.d_model * self.hidden + (self.hidden + self.d_model if self.b_in is not None else 0)

    def _pack(self, kernel: str) -> object:
        packs = []
        for e in range(self.num_experts):
            b_in = None if self.b_in is None else self.b_in[e]
            b_out = None if self.b_out is None else self.b_out[e]
            packs.append((prepack(self.w_in_int8[e], self.w_in_scale[e], b_in, kernel),
                          prepack(self.w_out_int8[e], self.w_out_scale[e], b_out, kernel)))
        return packs

    def forward(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        packs, kernel = self.packed()
        act = activation_fn(self.activation)
        out = xs.new_empty(xs.shape)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pack_in, pack_out = packs[e]
            if self.kind == "swiglu":
                g, u = int8_linear(xs[start : start + n], pack_in, kernel).chunk(2, dim=-1)
                h = act(g) * u
            else:  # the activation is fused into the first GEMM where the kernel can
                h = int8_linear(xs[start : start + n], pack_in, kernel, self.activation)
            out[start : start + n] = int8_linear(h, pack_out, kernel)
            start += n
        return out


INT8_BACKEND = "int8"


class Int8MoEFeedForward(MoEFeedForward):
    """An MoE layer with a float32 router and int8 experts (inference only).

    Same ``forward(x, modality_ids, mask) -> MoEOutput`` as ``MoEFeedForward``, with the
    routing statistics; the auxiliary losses are returned as zeros.
    """

    def __init__(self, layer: MoEFeedForward) -> None:  # noqa: D107 - built from a float layer
        nn.Module.__init__(self)
        self.d_model, self.config = layer.d_model, layer.config
        self.top_k, self.temperature = layer.top_k, layer.temperature
        self.groups = None
        self.router = copy.deepcopy(layer.router)
        self.experts = Int8Experts.from_experts(layer.experts)
        self.shared = None if layer.shared is None else quantize_modules(copy.deepcopy(layer.shared))

    # ``MoEFeedForward.backend`` picks among the float expert kernels; int8 experts always run on the int8
    # engine, so an int8 layer reports "int8" (code that asks a model which MoE kernel it runs works on int8
    # models too) and refuses a float kernel instead of ignoring it
    @property
    def backend(self) -> str:
        return INT8_BACKEND

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in ("auto", INT8_BACKEND):
            raise ValueError(f"an int8 MoE layer runs its experts on the int8 engine; backend {name!r} is a float "
                             f"kernel; valid here: 'auto', {INT8_BACKEND!r}")

    def expert_backend(self, tokens: torch.Tensor, counts: list[int]) -> str:
        """``"int8:<engine>"``: the int8 GEMM engine this layer's experts run on (the one ``forward`` uses)."""
        return f"{INT8_BACKEND}:{self.experts.packed()[1]}"

    def shared_params(self) -> int:
        return 0 if self.shared is None else sum(b.numel() for n, b in self.shared.named_buffers() if "scale" not in n)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> MoEOutput:
        r = self.route_tokens(x, modality_ids, mask)
        tokens, decision, plan = r.tokens, r.decision, r.plan
        rows = tokens.new_zeros(plan.token_index.shape[0] + 1, self.d_model)  # last row: dropped
        rows[:-1] = self.experts(tokens.index_select(0, plan.token_index), plan.counts)
        per_token = rows.index_select(0, plan.inverse).view(tokens.shape[0], self.top_k, self.d_model)
        y = torch.bmm(decision.weights.to(rows.dtype).unsqueeze(1), per_token).squeeze(1)
        y = r.scatter_back(y + self.shared(tokens) if self.shared is not None else y)
        return self._output(y.view(x.shape), r)

    @torch.no_grad()
    def routing_output(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> MoEOutput:
        """``forward`` without the experts: same router logits and statistics, output a zero view."""
        return self._output(x.new_zeros(()).expand(x.shape), self.route_tokens(x, modality_ids, mask))

    def _output(self, y: torch.Tensor, r) -> MoEOutput:
        decision, plan = r.decision, r.plan
        stats = compute_routing_stats(decision.probs, decision.experts, r.modality_ids, plan.routed_counts,
                                      plan.dropped, self.experts.params_per_expert(), self.shared_params())
        zero = r.logits.new_zeros(())
        return MoEOutput(y, r.logits, zero, zero, zero, zero, stats)


def quantize_modules(module: nn.Module, patch_embed: bool = True) -> nn.Module:
    """Replace, in place, every MoE layer, encoder MLP, ``nn.Linear`` and ``nn.Embedding`` below
    ``module``, and (``patch_embed=True``) every patch-embedding ``nn.Conv2d`` named ``patch_embed``."""
    if isinstance(module, MoEFeedForward) and not isinstance(module, Int8MoEFeedForward) and module.groups is None:
        return Int8MoEFeedForward(module)  # a groups-mode layer keeps its shell; its groups become int8
    if isinstance(module, Mlp) and activation_name(module.act) is not None:
        return Int8Mlp(module)
    if isinstance(module, nn.Linear):
        return Int8Linear.from_linear(module)
    if isinstance(module, nn.Embedding):
        return Int8Embedding.from_embedding(module)
    for name, child in list(module.named_children()):
        if name == "patch_embed" and isinstance(child, nn.Conv2d):
            if patch_embed and Int8PatchEmbed.supports(child):
                setattr(module, name, Int8PatchEmbed.from_conv(child))
            continue
        setattr(module, name, quantize_modules(child, patch_embed))
    return module


def quantize_int8(model: nn.Module, inplace: bool = False, scheme: str = SCHEME) -> nn.Module:
    """An int8 copy of ``model`` (an ``ErnieVL``) for CPU inference; see the module docstring.

    The backbone's modality embedding is a 3-row table and stays float32 (it is not text).
    ``scheme``: one of ``SCHEMES`` (the older one keeps the patch convolutions float32).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    int8_kernel()  # raises when this build has no int8 kernel
    target = model if inplace else copy.deepcopy(model)
    target = target.cpu().float().eval()
    modality_embed = getattr(getattr(target, "backbone", None), "modality_embed", None)
    quantize_modules(target, patch_embed=scheme != SCHEMES[0])
    if modality_embed is not None:
        target.backbone.modality_embed = modality_embed  # tiny float table, keep exact
    target.requires_grad_(False)
    return target


def quantization_scheme(model: nn.Module) -> str | None:
    """The scheme of ``SCHEMES`` that ``model``'s structure has, read from its modules (None: no int8 module).

    What ``save_pretrained`` records, so that ``from_pretrained`` rebuilds the same structure: a model whose
    patch convolutions are int8 is v2, one with int8 layers but float patch convolutions v1 (also a v2
    quantization whose patch convolutions could not be quantized: it loads back the same)."""
    modules = list(model.modules())
    if not any(isinstance(m, (Int8Linear, Int8Embedding, Int8Mlp, Int8MoEFeedForward, Int8PatchEmbed))
               for m in modules):
        return None
    return SCHEMES[1] if any(isinstance(m, Int8PatchEmbed) for m in modules) else SCHEMES[0]


def prepare_quantized(model: nn.Module, scheme: str) -> nn.Module:
    """The quantized structure for loading a checkpoint saved with ``scheme``."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r} in checkpoint; this version reads "
                         f"{', '.join(repr(s) for s in SCHEMES)}")
    return quantize_int8(model, inplace=True, scheme=scheme)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state dict (what save_pretrained writes, without the header)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
