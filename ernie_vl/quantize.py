"""Int8 inference on CPU: dynamic quantization of every linear layer, MoE experts included.

``quantize_int8(model)`` returns a copy of an ``ErnieVL`` in which
- every ``nn.Linear`` (encoder attention ``qkv`` / ``proj`` and MLPs, projectors, backbone
  attention and dense MLPs, heads, classifier) becomes ``Int8Linear``;
- every MoE layer becomes ``Int8MoEFeedForward``: the router stays float32 (routing decisions
  are not quantized), each expert's two matrices are int8;
- the text token embedding becomes ``Int8Embedding`` (per-row scales).
Weights are int8 with one float32 scale per output channel (symmetric). Activations are
quantized per call by PyTorch's fbgemm ``quantized::linear_dynamic`` kernel (x86), which also
runs the int8 GEMM; ``torch._int_mm`` was ~100x slower on CPU here and torchao is not
installed. Attention softmax, LayerNorms and the patch convolution stay float32.

The int8 weights and scales are plain buffers, so ``save_pretrained`` writes them to
safetensors like any tensor (the header records the scheme) and ``ErnieVL.from_pretrained``
returns the quantized model. Inference only: the quantized MoE reports routing statistics
but zero auxiliary losses, and nothing has gradients.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ernie_vl.moe import MoEFeedForward, MoEOutput
from ernie_vl.moe.grouped import activation_fn
from ernie_vl.moe.stats import compute_routing_stats

SCHEME = "int8-dynamic-per-channel-v1"


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., out, in) float -> int8 of the same shape and (..., out) float32 scales (symmetric, per row)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=-1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def prepack(weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm packed weights of one (out, in) int8 matrix with per-row scales."""
    zero_points = torch.zeros(weight_int8.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao (not installed)
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(weight_int8.cpu(), scale.double().cpu(), zero_points, 0)
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float().cpu())


def int8_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """(..., in) float -> (..., out) float through fbgemm's dynamic int8 linear."""
    lead = x.shape[:-1]
    y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float().contiguous(), packed, True)
    return y.reshape(*lead, y.shape[-1])


class _Packed(nn.Module):
    """Base: keeps fbgemm packed weights built lazily from the int8 buffers, rebuilt after loading."""

    def __init__(self) -> None:
        super().__init__()
        self._packed: list | None = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None

    def _apply(self, fn, recurse: bool = True):  # .to() / .cpu(): repack from the moved buffers
        self._packed = None
        return super()._apply(fn, recurse)


class Int8Linear(_Packed):
    """Drop-in for ``nn.Linear`` at inference: int8 weight (out, in), scales (out,), float bias."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._packed = [prepack(self.weight_int8, self.weight_scale, self.bias)]
        return int8_linear(x, self._packed[0])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


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

    def _pack(self) -> list:
        packs = []
        for e in range(self.num_experts):
            b_in = None if self.b_in is None else self.b_in[e]
            b_out = None if self.b_out is None else self.b_out[e]
            packs.append((prepack(self.w_in_int8[e], self.w_in_scale[e], b_in),
                          prepack(self.w_out_int8[e], self.w_out_scale[e], b_out)))
        return packs

    def forward(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if self._packed is None:
            self._packed = self._pack()
        act = activation_fn(self.activation)
        out = xs.new_empty(xs.shape)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pack_in, pack_out = self._packed[e]
            h = int8_linear(xs[start : start + n], pack_in)
            if self.kind == "swiglu":
                g, u = h.chunk(2, dim=-1)
                h = act(g) * u
            else:
                h = act(h)
            out[start : start + n] = int8_linear(h, pack_out)
            start += n
        return out


class Int8MoEFeedForward(MoEFeedForward):
    """An MoE layer with a float32 router and int8 experts (inference only).

    Same ``forward(x, modality_ids, mask) -> MoEOutput`` as ``MoEFeedForward``, with the
    routing statistics; the auxiliary losses are returned as zeros.
    """

    def __init__(self, layer: MoEFeedForward) -> None:  # noqa: D107 - built from a float layer
        nn.Module.__init__(self)
        self.d_model, self.config = layer.d_model, layer.config
        self.top_k, self.temperature = layer.top_k, layer.temperature
        self.router = copy.deepcopy(layer.router)
        self.experts = Int8Experts.from_experts(layer.experts)
        self.shared = None if layer.shared is None else quantize_modules(copy.deepcopy(layer.shared))

    def shared_params(self) -> int:
        return 0 if self.shared is None else sum(b.numel() for n, b in self.shared.named_buffers() if "scale" not in n)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> MoEOutput:
        r = self.route_tokens(x, modality_ids, mask)
        tokens, ids_r, decision, plan = r.tokens, r.modality_ids, r.decision, r.plan
        rows = tokens.new_zeros(plan.token_index.shape[0] + 1, self.d_model)  # last row: dropped
        rows[:-1] = self.experts(tokens.index_select(0, plan.token_index), plan.counts)
        per_token = rows.index_select(0, plan.inverse).view(tokens.shape[0], self.top_k, self.d_model)
        y = torch.bmm(decision.weights.to(rows.dtype).unsqueeze(1), per_token).squeeze(1)
        y = r.scatter_back(y + self.shared(tokens) if self.shared is not None else y)
        stats = compute_routing_stats(decision.probs, decision.experts, ids_r, plan.routed_counts,
                                      plan.dropped, self.experts.params_per_expert(), self.shared_params())
        zero = r.logits.new_zeros(())
        return MoEOutput(y.view(x.shape), r.logits, zero, zero, zero, zero, stats)


def quantize_modules(module: nn.Module) -> nn.Module:
    """Replace, in place, every MoE layer, ``nn.Linear`` and ``nn.Embedding`` below ``module``."""
    if isinstance(module, MoEFeedForward) and not isinstance(module, Int8MoEFeedForward):
        return Int8MoEFeedForward(module)
    if isinstance(module, nn.Linear):
        return Int8Linear.from_linear(module)
    if isinstance(module, nn.Embedding):
        return Int8Embedding.from_embedding(module)
    for name, child in list(module.named_children()):
        setattr(module, name, quantize_modules(child))
    return module


def quantize_int8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An int8 copy of ``model`` (an ``ErnieVL``) for CPU inference; see the module docstring.

    The backbone's modality embedding is a 3-row table and stays float32 (it is not text).
    """
    if "fbgemm" not in torch.backends.quantized.supported_engines and "x86" not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"int8 needs the fbgemm/x86 quantized engine; this build has {torch.backends.quantized.supported_engines}"
        )
    target = model if inplace else copy.deepcopy(model)
    target = target.cpu().float().eval()
    modality_embed = getattr(getattr(target, "backbone", None), "modality_embed", None)
    quantize_modules(target)
    if modality_embed is not None:
        target.backbone.modality_embed = modality_embed  # tiny float table, keep exact
    target.requires_grad_(False)
    target._checkpoint_metadata = {"quantization": SCHEME}
    return target


def prepare_quantized(model: nn.Module, scheme: str) -> nn.Module:
    """The quantized structure for loading a checkpoint saved with ``scheme``."""
    if scheme != SCHEME:
        raise ValueError(f"unknown quantization scheme {scheme!r} in checkpoint; this version reads {SCHEME!r}")
    return quantize_int8(model, inplace=True)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state dict (what save_pretrained writes, without the header)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
