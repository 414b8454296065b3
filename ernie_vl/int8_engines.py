"""int8 GEMM engines on the CPU: which one runs a call, its activation grid, and the call itself.

Two engines (``INT8_KERNELS``): oneDNN's ``qlinear_pointwise`` (bias, activation and a residual add
fused into the GEMM; builds a primitive per new input shape) and fbgemm's
``quantized::linear_dynamic``. ``auto`` (the default policy) times both once per GEMM shape and
thread count on the running CPU (``probe_int8_kernels``) and keeps the faster one; calls of varying
row counts (the MoE experts) use fbgemm, since oneDNN builds a primitive per new row count.

The activation grid (how many u8 levels a layer's input is quantized to) is a property of the
engine on this CPU (``activation_qmax``): 8 bits (0..255) where the engine's u8 x s8 products
accumulate in 32 bits (VNNI or AMX-INT8), 7 bits (0..127) elsewhere, as fbgemm's ``reduce_range``
(the AVX2 pair sums saturate 16 bits at full range). Each int8 layer records its grid when it is
quantized (``layer_activation_qmax``) and the fake-quant layers of ``ernie_vl.quantize_aware`` read
the same function, so a QAT model and the int8 model it converts to compute the same thing.
"""
from __future__ import annotations

import functools
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from encoders.activations import act_fn as activation_fn

#: int8 GEMM engines, in the order ``auto`` lists them
INT8_KERNELS = ("onednn", "fbgemm")
#: ``auto``: per GEMM shape (rows, in, out, threads, activation) the kernel a one-time probe measured
#: faster (``probe_int8_kernels``, cached per process); fbgemm for varying row counts (the MoE experts)
KERNEL_CHOICES = ("auto",) + INT8_KERNELS
#: the engine ``auto`` keeps unless the other one is measured faster by more than ``PROBE_MARGIN``
DEFAULT_KERNEL = "fbgemm"

#: activations oneDNN applies inside the GEMM: name -> (post op, algorithm)
ONEDNN_POST_OPS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "silu": ("swish", ""),
                   "relu": ("relu", "")}

#: activation grids: 7 bits (u8 0..127, fbgemm's reduce_range) and 8 bits (u8 0..255)
ACT_QMAX_7BIT, ACT_QMAX_8BIT = 127, 255
ACT_QMAXES = (ACT_QMAX_7BIT, ACT_QMAX_8BIT)


def available_int8_kernels() -> tuple[str, ...]:
    """The kernels of ``INT8_KERNELS`` this PyTorch build runs."""
    engines = torch.backends.quantized.supported_engines
    found = []
    if "onednn" in engines and hasattr(torch.ops.onednn, "qlinear_pointwise"):
        found.append("onednn")
    if "fbgemm" in engines or "x86" in engines:
        found.append("fbgemm")
    return tuple(found)


@functools.lru_cache(maxsize=None)
def _accumulates_in_32_bits() -> bool:
    """True when this CPU multiplies u8 x s8 into 32-bit sums without a 16-bit step (VNNI, AMX-INT8)."""
    from ernie_vl.runtime import cpu_info

    flags = cpu_info().flags
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags) or torch.cpu._is_vnni_supported()


def activation_qmax(kernel: str) -> int:
    """The activation grid ``kernel`` runs at on this CPU: 255 (8 bits) with VNNI / AMX-INT8, else 127.

    fbgemm follows PyTorch's own x86 rule (``reduce_range`` only without VNNI); oneDNN's AVX2 int8
    GEMMs sum u8 x s8 pairs in 16 bits as fbgemm's do, so it gets the same 7-bit grid there.
    """
    if kernel not in INT8_KERNELS:
        raise ValueError(f"unknown int8 kernel {kernel!r}; valid: {', '.join(INT8_KERNELS)}")
    return ACT_QMAX_8BIT if _accumulates_in_32_bits() else ACT_QMAX_7BIT


def check_act_qmax(qmax: int) -> int:
    if qmax not in ACT_QMAXES:
        raise ValueError(f"activation grid must be one of {ACT_QMAXES} (7 or 8 bits), got {qmax!r}")
    return int(qmax)


def bits_to_qmax(bits: int | None) -> int | None:
    """7 -> 127, 8 -> 255, None -> None (the engine's grid); anything else raises ValueError."""
    if bits is None:
        return None
    if bits not in (7, 8):
        raise ValueError(f"activation_bits must be 7, 8 or None (the engine's grid), got {bits!r}")
    return (1 << bits) - 1


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


def layer_activation_qmax(qmax: int | None = None) -> int:
    """The grid a layer quantized now records: ``qmax`` when given, else the smallest grid among the
    engines the current policy may run it on (a forced kernel: its own), so every one of them runs it."""
    if qmax is not None:
        return check_act_qmax(qmax)
    kernels = available_int8_kernels()
    if _choice[0] != "auto":
        kernels = (_choice[0],)
    return min((activation_qmax(k) for k in kernels), default=ACT_QMAX_7BIT)


#: (kernel, rows, in_features, out_features, activation) -> seconds of ONE timed sample; replaceable for tests
ProbeFn = Callable[[str, int, int, int, "str | None"], float]
_probe: list[ProbeFn | None] = [None]

#: interleaved timed samples per kernel (rotated order: each kernel goes first as often as the other)
PROBE_REPEATS = 7
#: the other engine must be this much faster (relative, medians) to replace ``DEFAULT_KERNEL``
PROBE_MARGIN = 0.10


@dataclass(frozen=True)
class ProbeRecord:
    """One ``auto`` decision: the kernel kept, every kernel's samples (seconds), and why."""

    kernel: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    default: str = DEFAULT_KERNEL
    margin: float = PROBE_MARGIN

    @property
    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items()}

    @property
    def reason(self) -> str:
        med = self.medians
        if len(med) < 2:
            return "only engine"
        fast = min(med, key=med.get)
        gain = 1.0 - med[fast] / med[self.default]
        if fast == self.default:
            return f"default {self.default} fastest"
        if self.kernel == self.default:
            return f"default kept ({fast} only {gain:.0%} faster, margin {self.margin:.0%})"
        return f"{self.kernel} {gain:.0%} faster than {self.default} (margin {self.margin:.0%})"


_probed: dict[tuple, ProbeRecord] = {}


def set_int8_probe(fn: ProbeFn | None) -> ProbeFn | None:
    """Replace the timing probe of ``auto`` (None: the real one) and clear its cache; returns the previous."""
    previous, _probe[0] = _probe[0], fn
    _probed.clear()
    return previous


def probed_int8_kernels() -> dict[tuple, str]:
    """The cached ``auto`` choices: (rows, in_features, out_features, threads, activation) -> kernel."""
    return {key: record.kernel for key, record in _probed.items()}


def probe_records() -> dict[tuple, ProbeRecord]:
    """The cached ``auto`` decisions with their samples (same keys as ``probed_int8_kernels``)."""
    return dict(_probed)


def choose_kernel(samples: dict[str, list[float]], default: str = DEFAULT_KERNEL,
                  margin: float = PROBE_MARGIN) -> str:
    """The kernel to keep from timed ``samples``: the fastest median, unless it beats ``default``'s
    median by ``margin`` (relative) or less; then ``default`` (load noise never flips a choice)."""
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    if not med:
        raise ValueError("choose_kernel needs at least one timed sample")
    if default not in med:
        return min(med, key=med.get)
    fast = min(med, key=med.get)
    return fast if med[fast] < (1.0 - margin) * med[default] else default


#: bytes of int8 weights the probe cycles through, so each call reads its weight from beyond the
#: L2 cache as a model's layers do (a single hot weight favoured oneDNN several-fold over what a model saw)
PROBE_WEIGHT_BYTES = 16 << 20


class _KernelBench:
    """Packed weight copies and an input for timing one GEMM shape; ``sample(kernel)`` is one timed pass."""

    def __init__(self, rows: int, in_features: int, out_features: int, activation: str | None) -> None:
        g = torch.Generator().manual_seed(0)
        self.copies = min(8, max(1, -(-PROBE_WEIGHT_BYTES // (in_features * out_features))))
        self.weights = [torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=g)
                        for _ in range(self.copies)]
        self.x = torch.randn(rows, in_features, generator=g)
        self.out_features, self.activation = out_features, activation
        self.packs: dict[str, list] = {}

    def sample(self, kernel: str) -> float:
        """Seconds of one call (mean over the weight copies); the first call per kernel warms up."""
        with torch.inference_mode():
            if kernel not in self.packs:
                n = self.out_features
                self.packs[kernel] = [prepack(w, torch.full((n,), 1e-3), torch.zeros(n), kernel) for w in self.weights]
                for packed in self.packs[kernel]:  # builds each primitive
                    int8_linear(self.x, packed, kernel, self.activation)
            start = time.perf_counter()
            for packed in self.packs[kernel]:
                int8_linear(self.x, packed, kernel, self.activation)
            return (time.perf_counter() - start) / self.copies


def time_int8_kernel(kernel: str, rows: int, in_features: int, out_features: int, reps: int = 3,
                     activation: str | None = None) -> float:
    """Median seconds of one int8 GEMM of this shape with ``kernel`` (after one warm-up call per weight),
    cycling through enough weight copies (``PROBE_WEIGHT_BYTES``, at most 8) that none stays in cache."""
    bench = _KernelBench(rows, in_features, out_features, activation)
    return statistics.median(bench.sample(kernel) for _ in range(reps))


def probe_int8_kernels(rows: int, in_features: int, out_features: int, activation: str | None = None) -> str:
    """The kernel for this GEMM shape (its fused activation included) at the current thread count:
    ``PROBE_REPEATS`` interleaved samples per kernel in rotated order, medians, ``choose_kernel``'s margin.
    Measured once and cached with its samples (``probe_records``)."""
    key = (rows, in_features, out_features, torch.get_num_threads(), activation)
    if key not in _probed:
        kernels = list(available_int8_kernels())
        if _probe[0] is not None:
            fake = _probe[0]

            def sample(kernel: str) -> float:
                return fake(kernel, rows, in_features, out_features, activation)
        else:
            sample = _KernelBench(rows, in_features, out_features, activation).sample
        samples: dict[str, list[float]] = {k: [] for k in kernels}
        for r in range(PROBE_REPEATS):
            for k in kernels[r % len(kernels):] + kernels[: r % len(kernels)]:
                samples[k].append(sample(k))
        default = DEFAULT_KERNEL if DEFAULT_KERNEL in kernels else kernels[0]
        _probed[key] = ProbeRecord(choose_kernel(samples, default), samples, default)
    return _probed[key].kernel


def int8_kernel(rows: int | None = None, in_features: int | None = None, out_features: int | None = None,
                activation: str | None = None) -> str:
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
    return probe_int8_kernels(rows, in_features, out_features, activation)


def prepack(weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, kernel: str):
    """Packed weights of one (out, in) int8 matrix with per-row scales for ``kernel``."""
    weight_int8, scale = weight_int8.cpu().contiguous(), scale.float().cpu().contiguous()
    bias = None if bias is None else bias.float().cpu().contiguous()
    zero_points = torch.zeros(weight_int8.shape[0], dtype=torch.long)
    if kernel == "onednn":
        return torch.ops.onednn.qlinear_prepack(weight_int8, None), scale, zero_points, bias
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao (not installed)
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(weight_int8, scale.double(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(qweight, bias)


def activation_qparams(lo: float, hi: float, qmax: int = ACT_QMAX_7BIT) -> tuple[float, int]:
    """(scale, zero point) of the per-tensor asymmetric u8 grid 0..``qmax`` spanning [lo, hi] and 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # 0 must be exact (zero padding, ReLU)
    scale = (hi - lo) / qmax if hi > lo else 1.0
    return scale, min(max(int(round(-lo / scale)), 0), qmax)


def quantize_activation(x: torch.Tensor, qmax: int = ACT_QMAX_7BIT) -> tuple[torch.Tensor, float, int]:
    """(M, K) float -> (uint8 (M, K) in [0, qmax], scale, zero point): per-tensor, asymmetric.

    One min/max pass and one quantize pass; the uint8 tensor shares the quantized tensor's
    storage (no ``int_repr`` copy). ``qmax``: 127 (7 bits) or 255 (8 bits), see ``activation_qmax``.
    """
    lo, hi = torch.aminmax(x)
    scale, zero_point = activation_qparams(float(lo), float(hi), qmax)
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao (not installed)
        warnings.simplefilter("ignore", UserWarning)
        qx = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)
    data = torch.empty(0, dtype=torch.uint8).set_(qx.untyped_storage(), qx.storage_offset(), qx.shape, qx.stride())
    return data, scale, zero_point


def int8_linear(x: torch.Tensor, packed, kernel: str, activation: str | None = None,
                qmax: int = ACT_QMAX_7BIT, residual: torch.Tensor | None = None) -> torch.Tensor:
    """(..., in) float -> activation((..., out)) [+ residual] through the int8 GEMM of ``kernel``.

    Activations are quantized per call, per tensor, to the grid 0..``qmax`` (fbgemm quantizes
    inside its kernel: ``reduce_range`` for 7 bits). ``activation``: None, or a name of
    ``encoders.activations``; oneDNN fuses those in ``ONEDNN_POST_OPS`` into the GEMM.
    ``residual`` (..., out): added to the output (oneDNN: inside the GEMM, no activation then).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    if kernel == "onednn":
        weight, scale, zero_points, bias = packed
        qx, x_scale, x_zero_point = quantize_activation(x2, qmax)
        if residual is not None and activation is None:
            other = residual.reshape(x2.shape[0], -1).float().contiguous()
            y = torch.ops.onednn.qlinear_pointwise.binary(
                qx, x_scale, x_zero_point, weight, scale, zero_points, other, bias, 1.0, 0, torch.float32,
                1.0, 0, "add", 1.0, "none", [], "")
            return y.reshape(*lead, y.shape[-1])
        post_op, algorithm = ONEDNN_POST_OPS.get(activation, ("none", ""))
        y = torch.ops.onednn.qlinear_pointwise(qx, x_scale, x_zero_point, weight, scale,
                                               zero_points, bias, 1.0, 0, torch.float32, post_op, [], algorithm)
        if activation is not None and activation not in ONEDNN_POST_OPS:
            y = activation_fn(activation)(y)
    else:
        y = torch.ops.quantized.linear_dynamic(x2, packed, qmax == ACT_QMAX_7BIT)
        if activation is not None:
            y = activation_fn(activation)(y)
    y = y.reshape(*lead, y.shape[-1])
    return y if residual is None else y + residual


_grid_warned: set[tuple[str, int]] = set()


def kernel_for_grid(kernel: str, qmax: int) -> str:
    """``kernel`` when it runs the activation grid ``qmax`` without saturating on this CPU, else an available
    engine that does; with none (an 8-bit checkpoint on a CPU without VNNI), ``kernel`` with a warning."""
    if activation_qmax(kernel) >= qmax:
        return kernel
    for other in available_int8_kernels():
        if activation_qmax(other) >= qmax:
            return other
    if (kernel, qmax) not in _grid_warned:
        _grid_warned.add((kernel, qmax))
        warnings.warn(f"int8 layers quantized with {qmax.bit_length()}-bit activations run on {kernel} on a CPU "
                      f"without VNNI / AMX-INT8, whose u8 x s8 pair sums can saturate; re-quantize the float model "
                      f"here (quantize_int8) for 7-bit activations", RuntimeWarning, stacklevel=3)
    return kernel
