"""``ernie-vl search INDEX "query text" [-k 10] [--image path.jpg] [--json] [--gallery out.html]
[--nprobe N] [--rerank N]``."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search",
        help="search an index with a sentence or an example image",
        description="Print the top-k images for a text query (or, with --image, for an example image). "
                    "The model is the one recorded in the index unless --model is given.",
    )
    p.add_argument("index", type=Path, help="index folder written by `ernie-vl index`")
    p.add_argument("query", nargs="?", default=None, help="text query")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--image", type=Path, default=None, help="search with this image instead of text")
    p.add_argument("--model", default=None,
                   help="the model to embed queries with (default: the one recorded in the index, if it loads "
                        "from local files; a recorded download is never started)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.add_argument("--gallery", type=Path, default=None, help="also write the hits to a .html or .png file")
    p.add_argument("--allow-outside", action="store_true",
                   help="let the gallery read files outside the indexed folder (absolute or '..' paths in the "
                        "index's metadata; off by default: an index from elsewhere could name any file)")
    p.add_argument("--device", default=None)
    p.add_argument("--mmap", action="store_true",
                   help="map the index file instead of reading it (large indexes; FAISS IO_FLAG_MMAP)")
    p.add_argument("--nprobe", type=int, default=None, metavar="N",
                   help="ivfpq indexes: inverted lists to visit per query (default: the index's setting, else nlist/8)")
    p.add_argument("--rerank", type=int, default=None, metavar="N",
                   help="ivfpq indexes built from parts: re-score the PQ top-N exactly against the float vectors "
                        "(N >= k; 0: PQ scores only; default: the index's re-rank factor x k)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ernie_vl.app.hub import download_reason, load_model, optional_device
    from retrieval.gallery import GALLERY_FORMATS, write_gallery
    from retrieval.index import Index
    from retrieval.names import json_text, printable
    from retrieval.search import search_image, search_text

    if (args.query is None) == (args.image is None):
        raise ValueError("give exactly one of a text QUERY or --image PATH")
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    if args.nprobe is not None and args.nprobe < 1:
        raise ValueError(f"--nprobe must be >= 1, got {args.nprobe}")
    if args.rerank is not None and not (args.rerank == 0 or args.rerank >= args.k):
        raise ValueError(f"--rerank is the PQ shortlist to re-score: 0 (none) or >= -k ({args.k}), got {args.rerank}")
    if args.gallery is not None and args.gallery.suffix.lower() not in GALLERY_FORMATS:
        raise ValueError(f"--gallery {str(args.gallery)!r} must end in one of {GALLERY_FORMATS}")
    manifest = Index.read_manifest(args.index)
    spec = args.model
    if spec is None:  # the index's own record: used only when it loads from local files
        spec = manifest.get("info", {}).get("model_spec")
        if not spec or not isinstance(spec, str):
            raise ValueError(f"index {str(args.index)!r} records no model; pass --model")
        reason = download_reason(spec)
        if reason:
            raise ValueError(f"index {str(args.index)!r} was built with the model {spec!r}, but {reason}; an "
                             f"index never starts a download. If you trust it, pass it yourself: --model {spec}")
    loaded = load_model(spec, device=optional_device(args.device))
    index = Index.load(args.index, model_id=loaded.model_id, mmap=args.mmap)
    if (args.nprobe is not None or args.rerank is not None) and index.kind != "ivfpq":
        raise ValueError(f"--nprobe and --rerank apply to ivfpq indexes; {str(args.index)!r} is a {index.kind!r} "
                         f"index (it already scores with the full vectors)")
    tuning = {"rerank": args.rerank, "nprobe": args.nprobe}
    if args.image is not None:
        hits = search_image(loaded.model, index, args.image, k=args.k, preprocess=loaded.preprocess,
                            model_id=loaded.model_id, **tuning)
        title = f"images like {args.image}"
    else:
        hits = search_text(loaded.model, index, args.query, k=args.k, tokenizer=loaded.tokenizer,
                           model_id=loaded.model_id, **tuning)
        title = f"images for {args.query!r}"
    root = index.info.get("root")
    if args.gallery is not None:
        write_gallery(hits, args.gallery, root=root, title=title, allow_outside=args.allow_outside)
    if args.json:
        out = {"query": args.query, "image": str(args.image) if args.image else None, "root": root,
               "hits": [h.to_dict() for h in hits]}
        if args.gallery is not None:
            out["gallery"] = str(args.gallery)
        print(json_text(out, indent=2))
    else:
        for h in hits:
            print(printable(f"{h.rank + 1:3d}  {h.score:8.4f}  {h.metadata.get('path', h.id)}"))
        if args.gallery is not None:
            print(f"gallery written to {args.gallery}")
    return 0
