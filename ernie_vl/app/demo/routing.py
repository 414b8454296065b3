"""Expert usage of the trained model on held-out data, per MoE layer and modality (for the heatmap)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ernie_vl.app.demo.workspace import Workspace, read_captions


def merge_layer_stats(calls: Sequence[Sequence[dict]]) -> list[dict]:
    """Per-layer ``usage_by_modality`` from several forward passes: each modality's row is the mean
    of the passes in which that modality was present (its row non-zero).

    ``calls[c][l]`` is ``RoutingStats.to_dict()`` of layer l in pass c; every pass has the same layers.
    """
    if not calls:
        raise ValueError("no forward passes to merge")
    num_layers = {len(c) for c in calls}
    if len(num_layers) != 1:
        raise ValueError(f"forward passes disagree on the number of MoE layers: {sorted(num_layers)}")
    merged = []
    for layer in range(num_layers.pop()):
        rows = np.stack([np.asarray(c[layer]["usage_by_modality"], dtype=np.float64) for c in calls])  # (C, M, E)
        present = rows.sum(-1) > 0                                                                      # (C, M)
        counts = present.sum(0)                                                                         # (M,)
        usage = (rows * present[..., None]).sum(0) / np.maximum(counts, 1)[:, None]
        merged.append({"usage_by_modality": usage.tolist()})
        if calls[0][layer].get("expert_group") is not None:  # modality groups: which group each expert is in
            merged[-1]["expert_group"] = list(calls[0][layer]["expert_group"])
    return merged


@torch.no_grad()
def heldout_routing(ws: Workspace, num_pairs: int = 32, num_clips: int = 16) -> list[dict]:
    """Routing statistics (one dict per MoE layer) of the trained model on held-out pairs and validation clips.

    One forward pass over images, their captions and clips; the model merges its per-modality
    backbone passes into one ``RoutingStats`` per layer.
    """
    from ernie_vl.model import ErnieVLBatch
    from retrieval import load_image

    from ernie_vl.app.demo.stages_eval import validation_clips

    model = ws.model()
    paths, captions = read_captions(ws.csv("heldout"))
    paths, captions = paths[:num_pairs], captions[:num_pairs]
    images = torch.stack([model.preprocess(load_image(p)) for p in paths])
    texts = model.tokenizer(captions)
    dataset = validation_clips(ws, model)
    step = max(1, len(dataset) // num_clips)
    items = [it for it in (dataset[i] for i in range(0, len(dataset), step)) if it is not None][:num_clips]
    batch = ErnieVLBatch(images=images, texts=texts)
    if items:
        batch.videos = torch.stack([c for c, _ in items])
        batch.video_labels = torch.tensor([int(y) for _, y in items])
    return merge_layer_stats([_layers(model(batch))])


def _layers(output: Any) -> list[dict]:
    routing = getattr(output, "routing", None)
    if not routing:
        raise ValueError("the model's forward returned no routing statistics (no MoE layer?)")
    return [s.to_dict() if hasattr(s, "to_dict") else dict(s) for s in routing]
