"""``ernie-vl index MODEL IMAGES_DIR --out INDEX``: embed a folder of images into a search index.

Re-running on the same ``--out`` embeds only new or changed files and drops deleted ones.
``ernie-vl index EMB/ --out INDEX`` builds the index from the parts ``ernie-vl embed`` wrote, without
re-embedding (IVF-PQ sized to ``--memory-budget``, read part by part).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ernie_vl.precision import PRECISIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index",
        help="embed a folder of images into a search index (incremental on re-run)",
        description="Embed every image under IMAGES_DIR and save an index folder. MODEL is an ErnieVL "
                    "checkpoint folder or open_clip:ARCH[:PRETRAINED_OR_PATH]. Unreadable files are "
                    "skipped and listed. With an existing --out only new or changed files are embedded.",
    )
    p.add_argument("model", help="checkpoint folder or open_clip:ARCH[:PRETRAINED_OR_PATH], or an EMB/ folder "
                                 "written by `ernie-vl embed`")
    p.add_argument("images_dir", type=Path, nargs="?", default=None,
                   help="folder of images (searched recursively), or an EMB/ folder of parts")
    p.add_argument("--out", type=Path, required=True, help="index folder to write (or update)")
    p.add_argument("--kind", default="auto", choices=("auto", "flat", "hnsw", "ivfpq"),
                   help="flat = exact; hnsw / ivfpq = approximate; auto = flat below 200k items (default)")
    p.add_argument("--memory-budget", default="4G",
                   help="building from EMB/: memory the index may take (default 4G; sizes IVF-PQ)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images (default 2)")
    p.add_argument("--keep-missing", action="store_true", help="keep items whose files were deleted")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 (default), bf16 (autocast; fast on CPUs with AVX512-BF16 / AMX) or int8")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ernie_vl.app.hub import load_model, model_spec_for_manifest, optional_device
    from retrieval.folder import index_folder
    from retrieval.index import MANIFEST, Index
    from retrieval.names import json_text, printable

    from retrieval.parts import is_parts_folder

    if args.images_dir is None or is_parts_folder(args.images_dir):
        return _from_parts(args)
    if not args.images_dir.is_dir():
        raise ValueError(f"IMAGES_DIR {str(args.images_dir)!r} is not a folder")
    loaded = load_model(args.model, device=optional_device(args.device), precision=args.precision)
    existing = None
    if (args.out / MANIFEST).exists():
        existing = Index.load(args.out, model_id=loaded.model_id)
        old_root = existing.info.get("root")
        if old_root and Path(old_root) != args.images_dir.resolve():
            raise ValueError(f"index {str(args.out)!r} was built from {old_root!r}, not "
                             f"{str(args.images_dir.resolve())!r}; use another --out")
    index, report = index_folder(
        loaded.model, args.images_dir, index=existing, kind=args.kind, model_id=loaded.model_id,
        preprocess=loaded.preprocess, batch_size=args.batch_size, num_workers=args.workers,
        keep_missing=args.keep_missing, progress=not args.no_progress,
        info={"model_spec": model_spec_for_manifest(args.model), "precision": args.precision},
    )
    index.save(args.out)
    if args.json:
        print(json_text({"index": str(args.out), "kind": index.kind, "count": len(index), "precision": args.precision,
                         "added": report.added, "updated": report.updated, "removed": report.removed,
                         "unchanged": report.unchanged, "failures": [list(f) for f in report.failures]}, indent=2))
    else:
        print(printable(f"index {args.out}: {len(index)} images ({index.kind}); {report.summary()}"))
        for path, reason in report.failures:
            print(printable(f"  skipped {path}: {reason}"), file=sys.stderr)
    return 0


def _from_parts(args: argparse.Namespace) -> int:
    """Build from ``ernie-vl embed``'s parts: ``index EMB/`` or ``index MODEL EMB/`` (the model id is then checked)."""
    from retrieval.index import Index
    from retrieval.names import json_text
    from retrieval.parts import is_parts_folder

    folder = Path(args.images_dir if args.images_dir is not None else args.model)
    if not is_parts_folder(folder):
        raise ValueError(f"{str(folder)!r} is not an embeddings folder (no manifest.json or parts); give "
                         f"MODEL IMAGES_DIR, or run `ernie-vl embed` first")
    model_id = None
    if args.images_dir is not None:
        from ernie_vl.app.hub import load_model

        model_id = load_model(args.model).model_id
    index = Index.build_from_parts(folder, kind=args.kind, memory_budget=args.memory_budget, model_id=model_id)
    index.save(args.out)
    summary = {"index": str(args.out), "kind": index.kind, "count": len(index), "from": str(folder),
               "plan": index.info.get("ivfpq_plan")}
    print(json_text(summary, indent=2) if args.json else f"index {args.out}: {len(index)} items ({index.kind}) from {folder}")
    return 0
