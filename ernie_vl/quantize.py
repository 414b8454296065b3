"""Int8 inference on CPU: dynamic quantization of every linear layer, MoE experts included.

``quantize_int8(model)`` returns a copy of an ``ErnieVL`` in which
- every ``nn.Linear`` (encoder attention ``qkv`` / ``proj``, projectors, resampler, backbone
  attention and dense MLPs, heads, classifier) becomes ``Int8Linear``;
- every encoder MLP becomes ``Int8Mlp`` (its GELU fused into the first GEMM where the kernel can);
- every patch-embedding convolution (kernel = stride) becomes ``Int8PatchEmbed``, an int8 GEMM
  over the flattened patches; the 3x3 convolutions and BatchNorms of a conv tokenizer before it
  (``conv_stem``, image or video) stay float32;
- every MoE layer becomes ``Int8MoEFeedForward``: the router stays float32 (routing decisions
  are not quantized), each expert's two matrices are int8;
- the text token embedding becomes ``Int8Embedding`` (per-row scales).
Weights are int8 with one float32 scale per output channel (symmetric). Activations are
quantized per call, per tensor, to the layer's grid (``act_qmax``: 8 bits where the CPU's int8
products accumulate in 32 bits, VNNI / AMX-INT8, else 7 bits; ``ernie_vl.int8_engines``), which
the layer records and saves. The GEMM engine (oneDNN or fbgemm) is chosen per call shape by
``ernie_vl.int8_engines.int8_kernel``; ``set_int8_kernel`` forces one. In the transformer blocks the
packed q/k/v projection quantizes its input once for all three, the MLP's activation is fused into
its first GEMM on oneDNN (``Int8Block`` can also move the residual adds into the GEMMs; off, measured
not faster). Attention itself (Q.K, softmax, P.V), LayerNorms, residual adds and the router stay float32.

The int8 weights and scales are plain buffers, so ``save_pretrained`` writes them to
safetensors like any tensor (the header records the scheme, ``SCHEMES``) and
``ErnieVL.from_pretrained`` returns the quantized model. Inference only: the quantized MoE
reports routing statistics but zero auxiliary losses, and nothing has gradients.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from encoders.activations import act_fn as activation_fn, act_name
from encoders.blocks import Block, Mlp
from ernie_vl.int8_engines import (  # noqa: F401 - the engine API is re-exported here
    ACT_QMAX_7BIT, ACT_QMAX_8BIT, INT8_KERNELS, KERNEL_CHOICES, ONEDNN_POST_OPS, PROBE_WEIGHT_BYTES, ProbeFn,
    ProbeRecord, activation_qmax, available_int8_kernels, bits_to_qmax, int8_kernel, int8_kernel_choice,
    int8_linear, kernel_for_grid, layer_activation_qmax, prepack, probe_int8_kernels, probe_records,
    probed_int8_kernels, quantize_activation, set_int8_kernel, set_int8_probe, time_int8_kernel)
from ernie_vl.moe import MoEFeedForward, MoEOutput
from ernie_vl.moe.stats import compute_routing_stats

#: checkpoint schemes this version reads: v2 also quantizes the patch convolutions; v3 (the default)
#: records each layer's activation grid (``act_qmax``: 7 or 8 bits; v1 and v2 ran 7 bits everywhere)
SCHEMES = ("int8-dynamic-per-channel-v1", "int8-dynamic-per-channel-v2", "int8-dynamic-per-channel-v3")
SCHEME = SCHEMES[-1]


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out, in) float -> int8 of the same shape and (..., out) float32 scales (symmetric, per row)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale



class _Packed(nn.Module):
    """Base: keeps packed weights per kernel, built lazily from the int8 buffers, rebuilt after loading."""

    def __init__(self, act_qmax: int | None = None, save_grid: bool = True) -> None:
        super().__init__()
        self._packed: dict[str, object] = {}
        # the activation grid (u8 0..act_qmax) this layer's inputs are quantized to; saved with scheme v3
        self.register_buffer("act_qmax", torch.tensor(layer_activation_qmax(act_qmax), dtype=torch.int16),
                             persistent=save_grid)
        self.grid = int(self.act_qmax)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = {}
        self.grid = int(self.act_qmax)

    def _apply(self, fn, recurse: bool = True):  # .to() / .cpu(): repack from the moved buffers
        self._packed = {}
        return super()._apply(fn, recurse)

    def packed(self, rows: int | None = None, shape: tuple[int, int] | None = None,
               activation: str | None = None) -> tuple[object, str]:
        """(packed weights, kernel) for a call of ``rows`` rows (None: varying) through a GEMM of
        ``shape`` (in, out) with ``activation`` fused; see ``int8_kernel``. The kernel runs this layer's grid."""
        kernel = kernel_for_grid(int8_kernel(rows, *(shape or (None, None)), activation), self.grid)
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

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_qmax: int | None = None,
                 save_grid: bool = True) -> None:
        super().__init__(act_qmax, save_grid)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_qmax: int | None = None, save_grid: bool = True) -> "Int8Linear":
        """``act_qmax`` None: the grid a QAT layer recorded (``linear.act_qmax``), else the engines' own."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    act_qmax or getattr(linear, "act_qmax", None), save_grid)
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

    def forward(self, x: torch.Tensor, activation: str | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """(..., in) -> activation(x W^T + b) [+ residual (..., out), fused into oneDNN's GEMM]."""
        packed, kernel = self.packed(x.numel() // max(x.shape[-1], 1), (self.in_features, self.out_features),
                                     activation)
        return int8_linear(x, packed, kernel, activation, self.grid, residual)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"act_qmax={self.grid}")


def activation_name(act: nn.Module) -> str | None:
    """The ``encoders.activations`` name of an activation module (None: not in the registry)."""
    try:
        return act_name(act)
    except ValueError:
        return None


class Int8Mlp(nn.Module):
    """Drop-in for ``encoders.blocks.Mlp``: int8 ``fc1`` with its activation fused, then int8 ``fc2``."""

    def __init__(self, mlp: Mlp, act_qmax: int | None = None, save_grid: bool = True) -> None:
        super().__init__()
        name = activation_name(mlp.act)
        if name is None:
            raise TypeError(f"no int8 MLP for activation {type(mlp.act).__name__}")
        self.activation = name
        self.fc1 = Int8Linear.from_linear(mlp.fc1, act_qmax, save_grid)
        self.fc2 = Int8Linear.from_linear(mlp.fc2, act_qmax, save_grid)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(..., C) -> fc2(act(fc1(x))) [+ residual, fused into fc2 where its engine can]."""
        return self.fc2(self.fc1(x, self.activation), residual=residual)


class Int8Block(Block):
    """``encoders.blocks.Block`` of int8 layers: ``forward(x (B, L, C), grid)`` as ``Block``.

    With ``fuse_residual`` the output projection and the second MLP GEMM add the residual inside the
    GEMM (oneDNN's binary post-op; fbgemm adds after it), where nothing sits between the GEMM and the
    add (no LayerScale; for attention no head gate, no windows). Off by default: on the Xeon (AMX) the
    fused GEMMs measured no faster at batch 8 and slower at batch 32 (``bench/int8_fusion.py``). The
    q/k/v projection is one packed GEMM, so its input is quantized once for all three.
    """

    fuse_residual = False

    def _fusable(self, ls: nn.Module, layer: nn.Module) -> bool:
        return self.fuse_residual and isinstance(ls, nn.Identity) and isinstance(layer, (Int8Linear, Int8Mlp))

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable(self.ls2, self.mlp):
            return super().mlp_residual(x)
        return self.mlp(self.norm2(x), residual=x)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.gate is not None or self.window_size is not None or not self._fusable(self.ls1, self.attn.proj):
            return super().forward(x, grid)
        b, n, c = x.shape
        q, k, v = self.attn.split_heads(self.norm1(x))
        x = self.attn.proj(self.attn.attend(q, k, v).transpose(1, 2).reshape(b, n, c), residual=x)
        return self.mlp_residual(x), None


class Int8PatchEmbed(_Packed):
    """Drop-in for a patch-embedding ``nn.Conv2d`` (kernel = stride, no padding): int8 GEMM over patches.

    ``forward(images (B, C, H, W)) -> (B, out, H/ph, W/pw)`` (a channels-last view: flattening
    the grid and transposing, as ``embed_patches`` does, gives contiguous tokens for free).
    Weight (out, C*ph*pw) int8 in the conv's (C, ph, pw) order, scales (out,), optional bias.
    """

    def __init__(self, in_chans: int, out_chans: int, patch: tuple[int, int], bias: bool,
                 act_qmax: int | None = None, save_grid: bool = True) -> None:
        super().__init__(act_qmax, save_grid)
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
    def from_conv(cls, conv: nn.Conv2d, act_qmax: int | None = None, save_grid: bool = True) -> "Int8PatchEmbed":
        if not cls.supports(conv):
            raise ValueError(f"Int8PatchEmbed needs kernel == stride, no padding / dilation / groups, got {conv}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias is not None,
                    act_qmax or getattr(conv, "act_qmax", None), save_grid)
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
        return int8_linear(patches, packed, kernel, qmax=self.grid).view(b, gh, gw, self.out_chans).permute(0, 3, 1, 2)


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

    def __init__(self, kind: str, activation: str, num_experts: int, d_model: int, hidden: int, bias: bool,
                 act_qmax: int | None = None, save_grid: bool = True) -> None:
        super().__init__(act_qmax, save_grid)
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
    def from_experts(cls, experts: nn.Module, act_qmax: int | None = None, save_grid: bool = True) -> "Int8Experts":
        if hasattr(experts, "w_gate_up"):
            w_in, w_out, b_in, b_out, kind = experts.w_gate_up, experts.w_down, None, None, "swiglu"
        elif hasattr(experts, "w1"):
            w_in, w_out, b_in, b_out, kind = experts.w1, experts.w2, experts.b1, experts.b2, "mlp"
        else:
            raise TypeError(f"cannot quantize experts of type {type(experts).__name__}")
        layer = cls(kind, experts.activation, experts.num_experts, experts.d_model, experts.hidden, b_in is not None,
                    act_qmax or getattr(experts, "act_qmax", None), save_grid)
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
                g, u = int8_linear(xs[start : start + n], pack_in, kernel, qmax=self.grid).chunk(2, dim=-1)
                h = act(g) * u
            else:  # the activation is fused into the first GEMM where the kernel can
                h = int8_linear(xs[start : start + n], pack_in, kernel, self.activation, self.grid)
            out[start : start + n] = int8_linear(h, pack_out, kernel, qmax=self.grid)
            start += n
        return out


INT8_BACKEND = "int8"


class Int8MoEFeedForward(MoEFeedForward):
    """An MoE layer with a float32 router and int8 experts (inference only).

    Same ``forward(x, modality_ids, mask) -> MoEOutput`` as ``MoEFeedForward``, with the
    routing statistics; the auxiliary losses are returned as zeros.
    """

    def __init__(self, layer: MoEFeedForward, act_qmax: int | None = None,  # noqa: D107 - from a float layer
                 save_grid: bool = True) -> None:
        nn.Module.__init__(self)
        self.d_model, self.config = layer.d_model, layer.config
        self.top_k, self.temperature = layer.top_k, layer.temperature
        self.groups = None
        self.router = copy.deepcopy(layer.router)
        self.experts = Int8Experts.from_experts(layer.experts, act_qmax, save_grid)
        self.shared = None if layer.shared is None else quantize_modules(copy.deepcopy(layer.shared),
                                                                         act_qmax=act_qmax, save_grid=save_grid)

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


def quantize_modules(module: nn.Module, patch_embed: bool = True, act_qmax: int | None = None,
                     save_grid: bool = True) -> nn.Module:
    """Replace, in place, every MoE layer, encoder MLP, ``nn.Linear`` and ``nn.Embedding`` below
    ``module``, and (``patch_embed=True``) every patch-embedding ``nn.Conv2d`` named ``patch_embed``.
    ``act_qmax``: the activation grid of every layer (None: what a QAT layer recorded, else the engines');
    ``save_grid``: whether the layers save it (scheme v3)."""
    grid = {"act_qmax": act_qmax, "save_grid": save_grid}
    if isinstance(module, MoEFeedForward) and not isinstance(module, Int8MoEFeedForward) and module.groups is None:
        return Int8MoEFeedForward(module, **grid)  # a groups-mode layer keeps its shell; its groups become int8
    if isinstance(module, Mlp) and activation_name(module.act) is not None:
        return Int8Mlp(module, **grid)
    if isinstance(module, nn.Linear):
        return Int8Linear.from_linear(module, **grid)
    if isinstance(module, nn.Embedding):
        return Int8Embedding.from_embedding(module)
    for name, child in list(module.named_children()):
        if name == "patch_embed" and isinstance(child, nn.Conv2d):
            if patch_embed and Int8PatchEmbed.supports(child):
                setattr(module, name, Int8PatchEmbed.from_conv(child, **grid))
            continue
        setattr(module, name, quantize_modules(child, patch_embed, **grid))
    if type(module) is Block:
        module.__class__ = Int8Block  # same parameters; its residual adds move into the int8 GEMMs
    return module


def quantize_int8(model: nn.Module, inplace: bool = False, scheme: str = SCHEME,
                  activation_bits: int | None = None) -> nn.Module:
    """An int8 copy of ``model`` (an ``ErnieVL``) for CPU inference; see the module docstring.

    The backbone's modality embedding is a 3-row table and stays float32 (it is not text).
    ``scheme``: one of ``SCHEMES`` (v1 keeps the patch convolutions float32; v1 and v2 quantize
    activations to 7 bits). ``activation_bits``: 7 or 8 for every layer; None (the default): the grid
    a QAT layer was fine-tuned for, else the one the int8 engines run at on this CPU (``activation_qmax``).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    act_qmax = bits_to_qmax(activation_bits)
    if scheme != SCHEME:
        if act_qmax not in (None, ACT_QMAX_7BIT):
            raise ValueError(f"scheme {scheme!r} quantizes activations to 7 bits; activation_bits "
                             f"{activation_bits} needs {SCHEME!r}")
        act_qmax = ACT_QMAX_7BIT
    int8_kernel()  # raises when this build has no int8 kernel
    target = model if inplace else copy.deepcopy(model)
    target = target.cpu().float().eval()
    modality_embed = getattr(getattr(target, "backbone", None), "modality_embed", None)
    quantize_modules(target, patch_embed=scheme != SCHEMES[0], act_qmax=act_qmax, save_grid=scheme == SCHEME)
    if modality_embed is not None:
        target.backbone.modality_embed = modality_embed  # tiny float table, keep exact
    target.requires_grad_(False)
    return target


def quantization_scheme(model: nn.Module) -> str | None:
    """The scheme of ``SCHEMES`` that ``model``'s structure has, read from its modules (None: no int8 module).

    What ``save_pretrained`` records, so that ``from_pretrained`` rebuilds the same structure: a model whose
    layers save their activation grid is v3; else one whose patch convolutions are int8 is v2, one with int8
    layers but float patch convolutions v1 (also a v2 quantization whose patch convolutions could not be
    quantized: it loads back the same)."""
    modules = list(model.modules())
    if not any(isinstance(m, (Int8Linear, Int8Embedding, Int8Mlp, Int8MoEFeedForward, Int8PatchEmbed))
               for m in modules):
        return None
    if any(isinstance(m, _Packed) and "act_qmax" not in m._non_persistent_buffers_set for m in modules):
        return SCHEMES[2]
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
