"""Index a folder of pictures once, then search it with sentences or an example picture.

Run against the demo's outputs (after ``ernie-vl demo``): index the held-out shapes with the
trained model and ask for a few things:

    python examples/image_text_search.py runs/demo/model runs/demo/data/shapes/images/heldout \
        --index runs/examples/shapes-index \
        --query "a large red circle" --query "a small blue square above a large green star" \
        --image-query runs/demo/data/shapes/images/val/val_000000.png \
        --gallery runs/examples/search.png

The same with an open_clip model (random weights offline; ``open_clip:ViT-B-32:laion2b_s34b_b79k``
or ``open_clip:ViT-B-32:/path/to/weights.pt`` for real ones):

    python examples/image_text_search.py open_clip:ViT-B-32 runs/demo/data/shapes/images/heldout \
        --index runs/examples/clip-index --query "a red circle"

A second run with the same ``--index`` embeds only pictures that are new or changed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="ErnieVL checkpoint folder or open_clip:ARCH[:PRETRAINED_OR_PATH]")
    p.add_argument("images", type=Path, help="folder of pictures (searched recursively)")
    p.add_argument("--index", type=Path, default=Path("runs/examples/index"), help="index folder (created or updated)")
    p.add_argument("--query", action="append", default=[], help="a sentence to search for (repeatable)")
    p.add_argument("--image-query", type=Path, default=None, help="find pictures like this one")
    p.add_argument("-k", type=int, default=5, help="hits per query")
    p.add_argument("--gallery", type=Path, default=None, help="write the hits of the first query as .png or .html")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from ernie_vl.app.hub import load_model, model_spec_for_manifest
    from retrieval import Index, search_image, search_text, write_gallery
    from retrieval.folder import index_folder

    loaded = load_model(args.model)
    # 1. Index the folder (only new or changed files are embedded when the index exists).
    existing = Index.load(args.index, model_id=loaded.model_id) if (args.index / "manifest.json").exists() else None
    index, update = index_folder(loaded.model, args.images, index=existing, model_id=loaded.model_id,
                                 preprocess=loaded.preprocess,
                                 info={"model_spec": model_spec_for_manifest(args.model)})
    index.save(args.index)
    print(f"index {args.index}: {len(index)} pictures ({update.summary()})")

    # 2. Search: sentences, then an example picture.
    root = Path(index.info["root"])
    results: dict = {"count": len(index), "update": update, "queries": {}}
    for query in args.query:
        hits = search_text(loaded.model, index, query, k=args.k, tokenizer=loaded.tokenizer)
        results["queries"][query] = hits
        _print(f"text: {query!r}", hits)
    if args.image_query is not None:
        hits = search_image(loaded.model, index, args.image_query, k=args.k, preprocess=loaded.preprocess)
        results["queries"][str(args.image_query)] = hits
        _print(f"image: {args.image_query}", hits)
    if args.gallery is not None and results["queries"]:
        first, hits = next(iter(results["queries"].items()))
        write_gallery(hits, args.gallery, root=root, title=f"top {args.k} for {first}")
        print(f"gallery: {args.gallery}")
    return results


def _print(title: str, hits: list) -> None:
    print(title)
    for hit in hits:
        print(f"  {hit.rank + 1:2d}. {hit.score:.3f}  {hit.metadata['path']}")


if __name__ == "__main__":
    main(sys.argv[1:])
