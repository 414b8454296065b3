"""Train ERNIE-VL on your own captioned images and labelled videos, then evaluate the result.

Your data, in the formats of DESIGN.md:
  * image-text pairs: a CSV with a header and columns ``filepath,caption`` (paths relative to the CSV);
  * labelled videos: a folder ``ROOT/<class name>/<file>.mp4`` (optionally ``ROOT/prompts.json``,
    class -> text prompts, for zero-shot use).

Run against the demo's outputs (after ``ernie-vl demo``), a 3-minute training from scratch:

    python examples/train_custom.py \
        --pairs runs/demo/data/shapes/train.csv --videos runs/demo/data/motion/train \
        --val-pairs runs/demo/data/shapes/heldout.csv --val-videos runs/demo/data/motion/val \
        --out runs/examples/custom --minutes 3

Continue an interrupted run with ``--resume`` (exact: model, optimizer, sampler and RNG states).
The trained model lands in ``OUT/final`` and works everywhere a model is taken:
``ernie-vl search``, ``ernie-vl classify OUT/final clip.mp4``, ``ernie-vl serve OUT/final ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", nargs="*", default=[], help="image-text CSV(s) (filepath,caption)")
    p.add_argument("--videos", nargs="*", default=[], help="labelled video folder(s) ROOT/<class>/<file>")
    p.add_argument("--val-pairs", default=None, help="held-out image-text CSV for Recall@K")
    p.add_argument("--val-videos", default=None, help="held-out video folder for top-1/top-5")
    p.add_argument("--out", type=Path, default=Path("runs/examples/custom"))
    p.add_argument("--model", default="tiny", help="preset to start from (ernie-vl list-models)")
    p.add_argument("--minutes", type=float, default=3.0, help="wall-clock training budget")
    p.add_argument("--max-steps", type=int, default=None, help="also stop after this many steps")
    p.add_argument("--batch-pairs", type=int, default=None)
    p.add_argument("--batch-videos", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from ernie_vl import ErnieVL
    from ernie_vl.train import TrainConfig, train
    from ernie_vl.train.evaluation import topk_accuracy

    sizes = {k: v for k, v in (("batch_pairs", args.batch_pairs), ("batch_videos", args.batch_videos)) if v}
    cfg = TrainConfig(out=str(args.out), model=args.model, pairs=args.pairs, videos=args.videos,
                      val_pairs=args.val_pairs, val_videos=args.val_videos, minutes=args.minutes,
                      max_steps=args.max_steps, resume=args.resume, checkpoint_every=50, **sizes)
    result = train(cfg)
    print(f"trained {result.steps} steps in {result.seconds:.0f}s ({result.samples_per_s:.1f} samples/s); "
          f"model in {result.final_dir}")

    # Evaluate the saved model from disk, the way a user of the checkpoint would.
    model = ErnieVL.from_pretrained(result.final_dir).eval()
    figures: dict = {"steps": result.steps, "final_dir": str(result.final_dir)}
    if args.val_pairs:
        figures.update(_retrieval(model, Path(args.val_pairs)))
    if args.val_videos:
        figures.update(_videos(model, Path(args.val_videos), topk_accuracy))
    print(json.dumps(figures, indent=2))
    return figures


def _retrieval(model, csv_path: Path) -> dict:
    """Recall@1/5/10 both ways on a held-out CSV."""
    from retrieval import ImageTextCSV, embed_images, embed_texts, recall_at_k

    data = ImageTextCSV(csv_path, transform=None)
    images = embed_images(model, data.image_paths, batch_size=64, progress=False)
    texts = embed_texts(model, data.captions)
    return recall_at_k(images.embeddings, texts, data.text_to_image)


def _videos(model, root: Path, topk_accuracy) -> dict:
    """Supervised top-1/top-5 on a held-out video folder."""
    import torch
    import video

    pre = model.preprocess
    dataset = video.VideoFolder(root, num_frames=model.cfg.video_encoder.num_frames, sampling="uniform",
                                classes=model.class_names,
                                transform=video.build_clip_transform(image_size=pre.image_size, mean=pre.mean,
                                                                     std=pre.std))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=video.collate_skip_none)
    logits, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            if batch is not None:
                logits.append(model.classify_video(batch[0]))
                labels.append(batch[1])
    acc = topk_accuracy(torch.cat(logits), torch.cat(labels), ks=(1, 5))
    return {"video_top1": acc[1], "video_top5": acc[5], "video_failures": len(dataset.failures)}


if __name__ == "__main__":
    main(sys.argv[1:])
