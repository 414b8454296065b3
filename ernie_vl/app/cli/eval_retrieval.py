"""``ernie-vl eval-retrieval MODEL captions.csv``: Recall@1/5/10 in both directions, as JSON."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval-retrieval",
        help="image-text retrieval Recall@K on a captions CSV",
        description="Embed the images and captions of a CSV (columns filepath, caption; several rows may "
                    "share an image, Flickr30K / COCO style) and print Recall@K both ways as JSON. "
                    "Rows whose image cannot be read are skipped and counted.",
    )
    p.add_argument("model", help="checkpoint folder or open_clip:ARCH[:PRETRAINED_OR_PATH]")
    p.add_argument("captions", type=Path, help="CSV with a header")
    p.add_argument("--image-col", default="filepath")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--ks", default="1,5,10", help="comma-separated K values (default 1,5,10)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError as err:
        raise ValueError(f"--ks must be comma-separated integers, got {text!r}") from err
    if not ks or min(ks) < 1:
        raise ValueError(f"--ks must be positive integers, got {text!r}")
    return ks


def run(args: argparse.Namespace) -> int:
    from ernie_vl.app.hub import load_model, optional_device
    from retrieval.datasets import ImageTextCSV
    from retrieval.embed import embed_images, embed_texts
    from retrieval.metrics import recall_at_k

    ks = parse_ks(args.ks)
    data = ImageTextCSV(args.captions, transform=None, image_col=args.image_col, caption_col=args.caption_col)
    loaded = load_model(args.model, device=optional_device(args.device))
    images = data.image_paths
    emb = embed_images(loaded.model, images, batch_size=args.batch_size, num_workers=args.workers,
                       preprocess=loaded.preprocess, progress=not args.no_progress)
    if not emb.positions:
        raise ValueError(f"none of the {len(images)} images in {str(args.captions)!r} could be read")
    new_pos = {old: new for new, old in enumerate(emb.positions)}
    t2i_all = data.text_to_image
    keep = [j for j, i in enumerate(t2i_all) if i in new_pos]
    text_emb = embed_texts(loaded.model, [data.captions[j] for j in keep], tokenizer=loaded.tokenizer,
                           progress=not args.no_progress)
    result = recall_at_k(emb.embeddings, text_emb, [new_pos[t2i_all[j]] for j in keep], ks=ks)
    report = {
        "model_id": loaded.model_id, "captions_csv": str(args.captions),
        "num_images": len(emb.positions), "num_captions": len(keep),
        "skipped_images": [list(f) for f in emb.failures], "skipped_captions": len(t2i_all) - len(keep),
        "recall": result,
        "rsum": sum(result.values()) * 100,
    }
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    if emb.failures:
        print(f"{len(emb.failures)} images could not be read and were left out", file=sys.stderr)
    return 0
