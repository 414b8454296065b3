"""The demo end to end: the stage list, the figures, the report, the summary.

``run_demo(cfg)`` runs (or resumes) every stage in ``cfg.out_dir`` and returns the report
dict that was written to ``report.json`` / ``report.html``.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from typing import Any, Callable, Optional

from ernie_vl.app.demo import plots
from ernie_vl.app.demo.config import DemoConfig
from ernie_vl.app.demo.report import write_report_html, write_report_json
from ernie_vl.app.demo.runner import OK_STATUSES, Stage, StageContext, StageRecord, StageRunner
from ernie_vl.app.demo.stages_apps import classify_videos, quantize_and_check, search_index
from ernie_vl.app.demo.stages_eval import evaluate_actions, evaluate_retrieval
from ernie_vl.app.demo.stages_train import generate_data, train_model
from ernie_vl.app.demo.summary import format_summary
from ernie_vl.app.demo.workspace import Workspace, list_videos

FIGURES = {
    "Training curves": "training_curves.png",
    "Query \u2192 top hits": "gallery.png",
    "Confusion matrix (actions)": "confusion_matrix.png",
    "Expert usage per modality and layer": "expert_usage.png",
    "Held-out results": "results.png",
}
CAPTIONS = {
    "Training curves": "Loss parts per step (smoothed; raw values faded), the MoE auxiliary losses, held-out "
                       "metrics at each evaluation, the routers' text/vision expert overlap and activated-parameter "
                       "ratio, the learning-rate schedule and the throughput.",
    "Query \u2192 top hits": "Search over the held-out images, whose colour-shape combinations never occur in "
                             "training. A green frame marks the image whose caption is exactly the query, red the "
                             "others; free-form and image queries have no single right answer (grey).",
    "Confusion matrix (actions)": "Validation clips of the motion actions: rows are the true class, columns the "
                                  "supervised head's prediction (row-normalised colour, counts written).",
    "Expert usage per modality and layer": "Share of each modality's tokens routed to each expert in every MoE "
                                           "layer, on held-out images, captions and clips; blue is below the "
                                           "uniform share, red above.",
    "Held-out results": "Recall@K both ways on held-out compositions, action top-1/top-5 (supervised head and "
                        "zero-shot from the class prompts), and how closely the int8 model follows fp32.",
}


def build_stages(ws: Workspace) -> list[Stage]:
    """The demo's stages in order, each bound to the workspace."""
    cfg = ws.cfg

    def bind(fn: Callable[[Workspace, StageContext], dict]) -> Callable[[StageContext], dict]:
        return lambda ctx: fn(ws, ctx)

    data = cfg.data_params()
    train = {**cfg.train_params()}
    evals = {"eval_batch_size": cfg.eval_batch_size}
    return [
        Stage("data", "Generate synthetic data", bind(generate_data), params=data,
              outputs=("data/shapes/train.csv", "data/shapes/heldout.csv", "data/motion/val/prompts.json")),
        Stage("train", f"Train {cfg.model}", bind(train_model), requires=("data",), params=train,
              outputs=("model/config.json", "model/model.safetensors")),
        Stage("retrieval", "Evaluate retrieval", bind(evaluate_retrieval), requires=("train",), params=evals),
        Stage("actions", "Evaluate actions", bind(evaluate_actions), requires=("train",), params=evals,
              outputs=("confusion_matrix.png",)),
        Stage("search", "Index and search", bind(search_index), requires=("train",),
              params={"queries": cfg.num_text_queries, "free": list(cfg.free_text_queries), "k": cfg.top_k},
              outputs=("index", "gallery.png")),
        Stage("classify", "Classify videos", bind(classify_videos), requires=("train",),
              params={"num_videos": cfg.num_videos, "k": cfg.top_k}),
        Stage("quantize", "Quantize to int8", bind(quantize_and_check), requires=("train",), params=evals),
        Stage("figures", "Draw figures", bind(draw_figures), requires=("train",), cacheable=False),
    ]


# ----------------------------------------------------------------------------- figures
def draw_figures(ws: Workspace, ctx: StageContext) -> dict:
    """Training curves from the trainer's log, expert usage from a held-out forward pass, a results chart."""
    bar = ctx.bar(total=3, unit="figure")
    made, errors = {}, {}
    for name, fn in (("training_curves.png", _training_curves), ("expert_usage.png", _expert_usage),
                     ("results.png", _results_chart)):
        bar.set_postfix_str(name)
        try:
            fn(ws, ctx)
            made[name] = True
        except Exception as err:  # one figure that cannot be drawn must not lose the others
            errors[name] = f"{type(err).__name__}: {err}"
        bar.update(1)
    if not made:
        raise RuntimeError(f"no figure could be drawn: {errors}")
    return {"figures": sorted(made), "errors": errors}


def _training_curves(ws: Workspace, ctx: StageContext) -> None:
    train = ctx.results.get("train", {})
    log = ws.root / train["log"] if train.get("log") else None
    if log is None or not log.exists():
        raise FileNotFoundError(f"the trainer's log {log} is missing")
    records = plots.read_jsonl(log)
    if train.get("evaluation") and train.get("steps"):  # the evaluation after the last step
        records.append({"step": train["steps"], "eval": train["evaluation"]})
    plots.plot_training_curves(records, ws.figure("training_curves.png"),
                               title=f"Training {ws.cfg.model} on the synthetic data")


def _expert_usage(ws: Workspace, ctx: StageContext) -> None:
    from ernie_vl.app.demo.routing import heldout_routing

    layers = heldout_routing(ws)
    moe = ws.model().cfg.backbone.moe
    names = moe.group_layout if moe is not None and moe.routing == "groups" else None
    plots.plot_expert_usage(plots.usage_matrix(layers), ws.figure("expert_usage.png"),
                            title="Expert usage per modality and MoE layer (held-out data)",
                            expert_groups=layers[0].get("expert_group"), group_names=names)


def _results_chart(ws: Workspace, ctx: StageContext) -> None:
    groups = {}
    held = ctx.results.get("retrieval", {}).get("heldout")
    if held:
        groups["retrieval, held-out compositions"] = {k.replace("text_to_image_", "t\u2192i ")
                                                      .replace("image_to_text_", "i\u2192t ").replace("_", " "): v
                                                      for k, v in held.items() if "_R@" in k}
    actions = ctx.results.get("actions")
    if actions:
        groups["actions"] = {f"{mode} top-{k}": actions[key][f"top{k}"]
                             for key, mode in (("supervised", "sup."), ("zero_shot", "zero-shot"))
                             for k in (1, 5) if f"top{k}" in actions.get(key, {})}
    quant = ctx.results.get("quantize", {})
    if "agreement" in quant:
        labels = {"size_ratio": "size int8/fp32", "image_embedding_cosine": "image emb. cosine",
                  "text_embedding_cosine": "text emb. cosine", "top1_agreement": "action top-1 agreement"}
        groups["int8 vs fp32"] = {labels.get(k, k): v for k, v in quant["agreement"].items() if isinstance(v, float)}
    plots.plot_metric_bars(groups, ws.figure("results.png"))


# ----------------------------------------------------------------------------- the report
def _headline(results: dict[str, dict]) -> dict[str, Any]:
    head: dict[str, Any] = {}
    held = results.get("retrieval", {}).get("heldout", {})
    for key, label in (("text_to_image_R@1", "text\u2192image R@1 (held-out)"),
                       ("image_to_text_R@1", "image\u2192text R@1 (held-out)")):
        if key in held:
            head[label] = held[key]
    actions = results.get("actions", {})
    for mode, label in (("supervised", "action top-1 (supervised)"), ("zero_shot", "action top-1 (zero-shot)")):
        if "top1" in actions.get(mode, {}):
            head[label] = actions[mode]["top1"]
    quant = results.get("quantize", {})
    for key, label in (("size_ratio", "int8 size / fp32"), ("top1_agreement", "int8 action agreement")):
        if key in quant.get("agreement", quant):
            head[label] = quant.get("agreement", quant)[key]
    train = results.get("train", {})
    if "steps" in train:
        head["training steps"] = train["steps"]
        head["training samples/s"] = train.get("samples_per_s")
    return head


def _commands(ws: Workspace, results: dict[str, dict]) -> list[str]:
    root = ws.cfg.out_dir
    cmds = []
    if "train" in results:
        cmds += [f"ernie-vl search {root}/index \"a large red circle\" -k 5",
                 f"ernie-vl search {root}/index --image {root}/data/shapes/images/val/val_000000.png -k 5"]
        try:
            clip = list_videos(ws.videos("val"))[0][0]
            cmds.append(f"ernie-vl classify {root}/model {root / ws.rel(clip)} --topk 3")
        except ValueError:
            pass
        cmds += [f"ernie-vl eval-video {root}/model {root}/data/motion/val --out {root}/actions/cli",
                 f"ernie-vl eval-retrieval {root}/model {root}/data/shapes/heldout.csv",
                 f"ernie-vl serve {root}/model --index {root}/index --port 8000"]
    return cmds


def _environment() -> dict[str, Any]:
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "cuda": torch.cuda.is_available()}


FIGURE_STAGE = {"gallery.png": "search", "confusion_matrix.png": "actions"}  # the others: "figures"


def _figure_is_current(name: str, results: dict[str, dict], ws: Workspace) -> bool:
    """The PNG exists and the stage that draws it finished in this run (no stale picture from an older one)."""
    stage = FIGURE_STAGE.get(name, "figures")
    if stage not in results or not (ws.root / name).exists():
        return False
    return stage != "figures" or name in results["figures"].get("figures", [])


def _note(record: StageRecord) -> str:
    """A line for the stage table: what went wrong inside a stage that still finished."""
    errors = record.result.get("errors") if isinstance(record.result, dict) else None
    return "; ".join(f"{k}: {v}" for k, v in errors.items()) if errors else ""


def assemble_report(ws: Workspace, records: list[StageRecord], total_seconds: float) -> dict[str, Any]:
    """The report dict (see ``ernie_vl.app.demo.report``) from the stage records."""
    results = {r.name: r.result for r in records if r.status in OK_STATUSES}
    sections: dict[str, Any] = {}
    if "data" in results:
        sections["Synthetic data"] = {k: v for k, v in results["data"].items() if k not in ("csv", "video_folders")}
    if "train" in results:
        sections["Training"] = {k: v for k, v in results["train"].items() if k != "routing"}
        if results["train"].get("routing"):
            sections["Routing at the end of training"] = results["train"]["routing"]
    if "retrieval" in results:
        sections["Retrieval (Recall@K)"] = results["retrieval"]
    if "actions" in results:
        sections["Action recognition"] = {k: v for k, v in results["actions"].items()
                                          if k not in ("confusion_matrix", "prompts")}
    if "quantize" in results:
        sections["int8 quantization"] = results["quantize"]
    figures = {title: name for title, name in FIGURES.items() if _figure_is_current(name, results, ws)}
    files = {"report": ws.rel(ws.root / "report.html")}
    for label, path in (("checkpoint", ws.model_dir), ("index", ws.index_dir)):
        if path.exists():
            files[label] = ws.rel(path)
    files.update({title: name for title, name in figures.items()})
    return {
        "title": "ERNIE-VL demo",
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "out_dir": str(ws.root),
        "total_seconds": round(total_seconds, 1),
        "headline": _headline(results),
        "stages": [{**{k: v for k, v in r.to_dict().items() if k != "result"}, "note": _note(r)} for r in records],
        "results": results,
        "sections": sections,
        "figures": figures,
        "captions": {title: CAPTIONS[title] for title in figures},
        "queries": results.get("search", {}).get("queries", []),
        "videos": results.get("classify", {}).get("videos", []),
        "commands": _commands(ws, results),
        "files": files,
        "config": ws.cfg.to_dict(),
        "environment": _environment(),
    }


def run_demo(cfg: DemoConfig, log: Optional[Callable[[str], None]] = None, print_summary: bool = True,
             resume: bool = True) -> dict[str, Any]:
    """Run (or resume) the demo into ``cfg.out_dir``; returns the report that was written."""
    import time

    start = time.perf_counter()
    ws = Workspace(cfg)
    runner = StageRunner(ws.root, show_progress=cfg.show_progress, resume=resume, log=log)
    records = runner.run(build_stages(ws))
    report = assemble_report(ws, records, time.perf_counter() - start)
    write_report_json(report, ws.root / "report.json")
    write_report_html(report, ws.root / "report.html", base_dir=ws.root)
    if print_summary:
        print(format_summary(report), flush=True)
    return report
