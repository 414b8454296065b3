"""The demo's figures, drawn from plain data: training curves, expert usage, a query -> hits gallery.

Everything here takes lists / dicts / arrays (no model), so it is tested on made-up inputs.
matplotlib runs headless (Agg); each function writes one PNG and returns its path.
"""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from encoders.lazy import require

matplotlib = require("matplotlib", "plots", "the demo's figures (ernie-vl demo)")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PathLike = str | Path

MODALITY_NAMES = ("text", "image", "video")


# ----------------------------------------------------------------------------- training curves
def read_jsonl(path: PathLike) -> list[dict]:
    """The JSON objects of a JSONL file; blank or broken lines (a crash mid-write) are skipped."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                records.append(value)
    return records


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dict -> ``{"a/b": float}`` keeping only finite-or-nan numbers (bools dropped)."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def _series(records: Sequence[dict], step_key: str = "step") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every numeric key -> (steps, values), in log order; records without a step use their position."""
    points: dict[str, list[tuple[float, float]]] = {}
    for position, record in enumerate(records):
        flat = flatten(record)
        step = flat.pop(step_key, float(position))
        for key, value in flat.items():
            points.setdefault(key, []).append((step, value))
    return {k: (np.array([p[0] for p in v]), np.array([p[1] for p in v])) for k, v in points.items()}


def _ema(values: np.ndarray, alpha: float) -> np.ndarray:
    out = np.empty_like(values)
    acc = values[0]
    for i, v in enumerate(values):
        acc = alpha * v + (1 - alpha) * acc if np.isfinite(v) else acc
        out[i] = acc
    return out


NOT_LOSSES = {"step", "lr", "samples", "step_time", "samples_per_s", "grad_norm", "epoch", "seconds"}
AUX_HINTS = ("aux", "balance", "z_loss", "orthogonal", "router")


def _is_loss(key: str) -> bool:
    """``loss`` and its parts: top-level numbers that are not bookkeeping, or any key naming a loss."""
    if _is_eval_metric(key) or _is_lr(key) or _is_throughput(key):
        return False
    if "/" in key:
        return "loss" in key.lower()
    return key not in NOT_LOSSES


def _is_aux(key: str) -> bool:
    leaf = key.split("/")[-1].lower()
    return any(h in leaf for h in AUX_HINTS)


def _is_routing(key: str) -> bool:
    return key in ("routing/overlap_rate", "routing/activated_param_ratio")


def _is_eval_metric(key: str) -> bool:
    k = key.lower()
    return "r@" in k or "top1" in k or "top5" in k or "accuracy" in k


def _is_lr(key: str) -> bool:
    return key.split("/")[-1].lower() in ("lr", "learning_rate")


def _is_throughput(key: str) -> bool:
    k = key.lower()
    return "samples_per_s" in k or "samples/s" in k or "throughput" in k


def _short(key: str) -> str:
    for prefix in ("losses/", "loss/", "train/", "eval/", "metrics/", "routing/"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def curve_panels(records: Sequence[dict], max_loss_curves: int = 8) -> list[tuple[str, list[str]]]:
    """Which series go in which panel: ``[(kind, keys)]`` for kinds loss, aux, held-out, routing, lr, speed
    (empty panels left out; losses sorted total first, then by final size)."""
    series = _series(records)
    every_loss = [k for k in series if _is_loss(k)]
    every_loss.sort(key=lambda k: (_short(k) != "loss", -abs(float(series[k][1][-1]))))
    groups = (
        ("loss", [k for k in every_loss if not _is_aux(k)][:max_loss_curves]),
        ("aux", [k for k in every_loss if _is_aux(k)][:max_loss_curves]),
        ("held-out", _key_metrics(sorted(k for k in series if _is_eval_metric(k)))),
        ("routing", [k for k in series if _is_routing(k)]),
        ("lr", [k for k in series if _is_lr(k)]),
        ("speed", [k for k in series if _is_throughput(k)]),
    )
    return [(kind, keys) for kind, keys in groups if keys]


def _key_metrics(keys: list[str], limit: int = 6) -> list[str]:
    """All held-out metrics when few; else only the R@1 and top-1 ones (the panel stays readable)."""
    if len(keys) <= limit:
        return keys
    short = [k for k in keys if k.endswith("R@1") or k.endswith("top1")]
    return (short or keys)[:limit]


def plot_training_curves(records: Sequence[dict], path: PathLike, title: str = "Training",
                         max_loss_curves: int = 8) -> Path:
    """Loss parts (smoothed, raw faded), held-out metrics, learning rate and throughput against step.

    ``records`` are the trainer's JSONL lines: dicts with a ``step`` and any nesting of
    numbers (``{"loss": .., "losses": {"clip": ..}, "lr": .., "eval": {"text_to_image_R@1": ..}}``).
    Panels with nothing to show are left out; with no numbers at all a ValueError names the keys seen.
    """
    series = _series(records)
    panels = curve_panels(records, max_loss_curves)
    if not panels:
        seen = sorted({k for r in records for k in flatten(r)})
        raise ValueError(f"no loss, metric, lr or throughput values in the log; keys seen: {seen[:20]}")

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.5 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    first = min(float(series[k][0].min()) for _, keys in panels for k in keys)
    last = max(float(series[k][0].max()) for _, keys in panels for k in keys)
    for ax, (kind, keys) in zip(axes.flat, panels):
        if last > first:
            ax.set_xlim(first, last + 0.02 * (last - first))  # one step axis for every panel
        cmap = plt.get_cmap("tab10")
        for i, key in enumerate(keys):
            steps, values = series[key]
            color = cmap(i % 10)
            if kind in ("loss", "aux") and len(values) > 20:
                ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
                ax.plot(steps, _ema(values, alpha=min(1.0, 10.0 / len(values))), color=color,
                        linewidth=1.6, label=_short(key))
            else:
                marker = "o" if len(values) <= 30 else None
                ax.plot(steps, values, color=color, linewidth=1.6, marker=marker, markersize=3,
                        label=_short(key))
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if kind in ("loss", "aux"):
            ax.set_title("losses (smoothed)" if kind == "loss" else "MoE auxiliary losses (unweighted)")
            positive = all(np.nanmin(series[k][1]) > 0 for k in keys)
            spread = max(np.nanmax(series[k][1]) for k in keys) / max(
                1e-12, min(np.nanmin(series[k][1]) for k in keys)) if positive else 0
            if positive and spread > 30:
                ax.set_yscale("log")
        elif kind == "held-out":
            ax.set_title("held-out metrics")
            ax.set_ylim(-0.02, 1.02)
        elif kind == "routing":
            ax.set_title("MoE routing")
            ax.set_ylim(-0.02, 1.02)
        elif kind == "lr":
            ax.set_title("learning rate")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        else:
            ax.set_title("throughput (samples/s)")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- expert usage
def usage_matrix(layer_stats: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """(layers, modalities, experts) from per-layer ``RoutingStats.to_dict()`` (``usage_by_modality``)."""
    if not layer_stats:
        raise ValueError("no MoE layer statistics to plot (the model has no MoE layer?)")
    mats = []
    for i, stats in enumerate(layer_stats):
        usage = stats.get("usage_by_modality") if isinstance(stats, Mapping) else None
        if usage is None:
            raise ValueError(f"layer {i} statistics lack 'usage_by_modality'; keys: {sorted(stats)}")
        mats.append(np.asarray(usage, dtype=np.float64))
    shapes = {m.shape for m in mats}
    if len(shapes) != 1 or mats[0].ndim != 2:
        raise ValueError(f"usage_by_modality must be (modalities, experts) and equal in every layer, got {shapes}")
    return np.stack(mats)


def plot_expert_usage(usage: np.ndarray, path: PathLike, modality_names: Sequence[str] = MODALITY_NAMES,
                      title: str = "Expert usage per modality and layer", expert_groups: Sequence[int] | None = None,
                      group_names: Sequence[str] | None = None) -> Path:
    """Heatmaps (one per modality present): rows are MoE layers, columns experts, cells the share of tokens.

    ``usage`` is (layers, modalities, experts) with each present row summing to ~1 (the
    fraction of that modality's routed tokens per expert, as ``RoutingStats.usage_by_modality``).
    Modalities whose rows are all zero (absent) are left out. The colour scale is centred on
    the uniform share 1/E so that over- and under-used experts stand out.
    ``expert_groups`` (E,) (``RoutingStats.expert_group``, modality groups): columns are labelled
    ``<group initial><index>`` and the groups separated by lines; each modality's colour scale is
    centred on 1/(size of the group its tokens went to).
    """
    usage = np.asarray(usage, dtype=np.float64)
    if usage.ndim != 3:
        raise ValueError(f"usage must be (layers, modalities, experts), got shape {usage.shape}")
    num_layers, num_mod, num_experts = usage.shape
    present = [m for m in range(num_mod) if np.any(usage[:, m] > 0)]
    if not present:
        raise ValueError("expert usage is zero for every modality: nothing was routed")
    groups = None if expert_groups is None else np.asarray(expert_groups, dtype=np.int64)
    if groups is not None and groups.shape != (num_experts,):
        raise ValueError(f"expert_groups must give one group per expert ({num_experts}), got shape {groups.shape}")
    uniform = 1.0 / num_experts
    if groups is not None:  # the smallest group decides the shared colour range
        uniform = 1.0 / np.bincount(groups).max()
    vmax = max(2.0 / (num_experts if groups is None else np.bincount(groups).min()), float(usage.max()))
    fig, axes = plt.subplots(1, len(present), figsize=(1.2 + 0.55 * num_experts * len(present) + 1.0,
                                                       1.6 + 0.45 * num_layers), squeeze=False,
                             layout="constrained")
    image = None
    for ax, m in zip(axes[0], present):
        data = usage[:, m]
        centre, shown, cmap = uniform, data, matplotlib.colormaps["RdBu_r"]
        if groups is not None:  # 1 / size of the group this modality's tokens use; other groups greyed out
            own = groups == groups[int(data.sum(0).argmax())]
            centre = 1.0 / int(own.sum())
            shown = np.ma.masked_where(np.broadcast_to(~own, data.shape), data)
            cmap = cmap.with_extremes(bad="#dddddd")
        image = ax.imshow(shown, cmap=cmap, aspect="auto",
                          norm=matplotlib.colors.TwoSlopeNorm(vcenter=min(centre, 0.999 * vmax), vmin=0.0, vmax=vmax))
        name = modality_names[m] if m < len(modality_names) else f"modality {m}"
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_xticks(range(num_experts))
        if groups is not None:
            names = list(group_names or [f"group {g}" for g in range(int(groups.max()) + 1)])
            within = [int((groups[:e] == groups[e]).sum()) for e in range(num_experts)]
            ax.set_xticklabels([f"{names[g][0].upper()}{i}" for g, i in zip(groups, within)], fontsize=7)
            for edge in np.flatnonzero(np.diff(groups)) + 0.5:
                ax.axvline(edge, color="black", linewidth=1.5)
            ax.set_xlabel("expert (" + " | ".join(f"{n}: {n[0].upper()}*" for n in names) + ")")
        ax.set_yticks(range(num_layers))
        ax.set_yticklabels([f"MoE {i}" for i in range(num_layers)])
        if num_experts * num_layers <= 160:
            for li in range(num_layers):
                for e in range(num_experts):
                    v = data[li, e]
                    if np.ma.is_masked(shown[li, e]):
                        continue
                    r, g, b, _ = image.cmap(image.norm(v))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(e, li, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    label = f"share of tokens (uniform = {uniform:.3g})" if groups is None else "share of tokens (centre: uniform in group)"
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.9, label=label)
    fig.suptitle(title)
    return _save(fig, path)


# ----------------------------------------------------------------------------- query gallery
def plot_query_gallery(queries: Sequence[Mapping[str, Any]], path: PathLike, max_hits: int = 5,
                       title: str = "Queries and their top hits") -> Path:
    """One row per query: the query (text, or its image), then its top hits with score and caption.

    Each query: ``{"query": str, "kind": "text"|"image", "image": path (image queries),
    "hits": [{"path": str, "score": float, "caption": str, "correct": bool|None}, ...]}``.
    Correct hits get a green frame, wrong ones red, unknown grey.
    """
    if not queries:
        raise ValueError("no queries to draw")
    cols = 1 + max(1, min(max_hits, max(len(q.get("hits", [])) for q in queries)))
    fig, axes = plt.subplots(len(queries), cols, figsize=(2.1 * cols, 2.9 * len(queries)), squeeze=False,
                             layout="constrained")
    for row, query in zip(axes, queries):
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        qax = row[0]
        if query.get("kind") == "image" and query.get("image"):
            qax.imshow(_load_rgb(query["image"]), interpolation="nearest")
            qax.set_title("image query", fontsize=9, fontweight="bold")
        else:
            qax.set_facecolor("#f3f3f8")
            qax.text(0.5, 0.5, "\n".join(textwrap.wrap(f"\u201c{query.get('query', '')}\u201d", 18)),
                     ha="center", va="center", fontsize=9, transform=qax.transAxes, style="italic")
            qax.set_title("text query", fontsize=9, fontweight="bold")
        for rank, (ax, hit) in enumerate(zip(row[1:], query.get("hits", [])[: cols - 1]), start=1):
            ax.imshow(_load_rgb(hit["path"]), interpolation="nearest")
            correct = hit.get("correct")
            color = "#999999" if correct is None else ("#1a9850" if correct else "#d73027")
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3.5)
            caption = hit.get("caption") or Path(hit["path"]).name
            mark = {True: " \u2713", False: " \u2717"}.get(correct, "")
            ax.set_title(f"#{rank} score {hit.get('score', float('nan')):.3f}{mark}", fontsize=8, color=color)
            ax.set_xlabel("\n".join(textwrap.wrap(caption, 24)[:3]), fontsize=6.5)
        for ax in row[1 + len(query.get("hits", [])):]:
            ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def _load_rgb(path: PathLike) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ----------------------------------------------------------------------------- bar chart of metrics
def plot_metric_bars(groups: Mapping[str, Mapping[str, float]], path: PathLike,
                     title: str = "Held-out results") -> Path:
    """Grouped bars in [0, 1]: ``{"retrieval": {"text_to_image_R@1": .8, ...}, "actions": {...}}``."""
    groups = {g: {k: float(v) for k, v in m.items() if _finite(v)} for g, m in groups.items()}
    groups = {g: m for g, m in groups.items() if m}
    if not groups:
        raise ValueError("no finite metrics to draw")
    fig, axes = plt.subplots(1, len(groups), figsize=(max(4.0, 0.55 * sum(map(len, groups.values())) + 2),
                                                      3.4), squeeze=False,
                             gridspec_kw={"width_ratios": [max(2, len(m)) for m in groups.values()]})
    for ax, (group, metrics) in zip(axes[0], groups.items()):
        names = list(metrics)
        values = [metrics[n] for n in names]
        bars = ax.bar(range(len(names)), values, color=plt.get_cmap("tab10")(0), alpha=0.85)
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom",
                    fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
        ax.set_ylim(0, 1.1)
        ax.set_title(group)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _save(fig: "plt.Figure", path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

