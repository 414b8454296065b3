"""Start ERNIE-VL from CLIP weights, check that it equals CLIP at the start, quantize it to int8, and serve it.

``ernie_vl.from_open_clip`` takes CLIP's image tower and text embedding as they are and turns
CLIP's text transformer into the shared backbone, each feed-forward upcycled into a
mixture of experts (visual tokens pass through gated residuals that start closed), so the
model starts exactly at CLIP's retrieval quality and fine-tuning grows the MoE from there.

Run against the demo's outputs (after ``ernie-vl demo``), offline (random CLIP weights: the
parity checks still hold, the search results are meaningless):

    python examples/from_open_clip.py --images runs/demo/data/shapes/images/heldout \
        --out runs/examples/clip-moe --query "a large red circle"

Real CLIP weights (online, or a local file):

    python examples/from_open_clip.py --pretrained laion2b_s34b_b79k --images ~/Pictures --out runs/clip-moe
    python examples/from_open_clip.py --pretrained /path/to/open_clip_pytorch_model.bin ...

Add ``--serve`` to keep the HTTP server up on ``--port`` (``curl -X POST localhost:8000/search
-H 'content-type: application/json' -d '{"text": "a red circle", "k": 5}'``; Ctrl-C stops it).
Fine-tune the converted model like any checkpoint: ``ernie-vl train --model OUT/fp32 ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (open_clip.list_models())")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local weights file")
    p.add_argument("--experts", type=int, default=8, help="experts per upcycled feed-forward")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--images", type=Path, required=True, help="folder of pictures to index and serve")
    p.add_argument("--out", type=Path, default=Path("runs/examples/clip-moe"))
    p.add_argument("--query", default="a large red circle", help="a search to try through the server")
    p.add_argument("--serve", action="store_true", help="keep serving on --port until Ctrl-C")
    p.add_argument("--port", type=int, default=8000)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import httpx
    import open_clip
    import torch
    import torch.nn.functional as F

    import ernie_vl
    from ernie_vl.quantize import state_dict_bytes
    from ernie_vl.app.serve import ServerThread, create_app, run_server
    from retrieval import load_image
    from retrieval.datasets import list_image_files
    from retrieval.folder import index_folder

    torch.manual_seed(0)
    clip = open_clip.create_model(args.arch, pretrained=args.pretrained).eval()
    model = ernie_vl.from_open_clip(clip, num_experts=args.experts, top_k=args.top_k).eval()

    # 1. At the start the converted model *is* CLIP: same embeddings for text and images.
    files = list_image_files(args.images)[:4]
    if not files:
        raise ValueError(f"no pictures under {str(args.images)!r}")
    images = torch.stack([model.preprocess(load_image(p)) for p in files])
    tokens = model.tokenizer(["a large red circle", "a small blue square at the top"])
    with torch.inference_mode():
        text_gap = (model.encode_text(tokens) - F.normalize(clip.encode_text(tokens), dim=-1)).abs().max().item()
        image_gap = (model.encode_image(images) - F.normalize(clip.encode_image(images), dim=-1)).abs().max().item()
    print(f"max |ERNIE-VL - CLIP|: text {text_gap:.2e}, image {image_gap:.2e}")
    model.save_pretrained(str(args.out / "fp32"))

    # 2. int8 weights for every linear layer (CPU inference): size and agreement with fp32.
    int8 = ernie_vl.quantize_int8(model)
    with torch.inference_mode():
        cos_image = F.cosine_similarity(int8.encode_image(images), model.encode_image(images)).min().item()
        cos_text = F.cosine_similarity(int8.encode_text(tokens), model.encode_text(tokens)).min().item()
    size_ratio = state_dict_bytes(int8) / state_dict_bytes(model)
    print(f"int8: {size_ratio:.2f}x the fp32 size; cosine to fp32 >= {min(cos_image, cos_text):.4f}")
    int8.save_pretrained(str(args.out / "int8"))

    # 3. Index the pictures with the int8 model and serve search over HTTP (dynamic batching).
    index, update = index_folder(int8, args.images, model_id=int8.model_id, progress=False,
                                 info={"model_spec": str((args.out / "int8").resolve())})
    index.save(args.out / "index")
    print(f"indexed {len(index)} pictures into {args.out / 'index'} ({update.summary()})")
    app = create_app(int8, int8.preprocess, int8.tokenizer, int8.model_id, index)
    if args.serve:
        print(f"serving on http://127.0.0.1:{args.port} (POST /search, /embed/text, /embed/image; GET /health)")
        run_server(app, port=args.port)
        return {}
    with ServerThread(app) as url:
        reply = httpx.post(f"{url}/search", json={"text": args.query, "k": 3}, timeout=60).json()
    for hit in reply["hits"]:
        print(f"  {hit['score']:.3f}  {hit.get('metadata', {}).get('path', hit)}")
    summary = {"text_max_abs_diff": text_gap, "image_max_abs_diff": image_gap, "int8_size_ratio": size_ratio,
               "int8_min_cosine": min(cos_image, cos_text), "indexed": len(index), "hits": reply["hits"]}
    print(json.dumps({k: v for k, v in summary.items() if k != "hits"}, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
