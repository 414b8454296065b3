"""Run by the data-scale tests in a subprocess: a few training steps under resource limits, peak RSS as JSON.

``python _data_scale_run.py SPEC_JSON``; SPEC keys: csv, out, mode ("ram" | "cache" | "stream"), nofile,
workers, steps, image_size (of the ``test`` preset), cache_dir. Prints one JSON line:
``{"rss_before_mb", "rss_ready_mb" (data in place), "rss_peak_mb", "steps", "streaming"}`` (peak: this process).
"""
from __future__ import annotations

import json
import resource
import sys


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("nofile"):
        resource.setrlimit(resource.RLIMIT_NOFILE, (spec["nofile"], spec["nofile"]))
    import torch

    from ernie_vl.train import TrainConfig

    torch.set_num_threads(1)
    size = spec.get("image_size", 32)
    overrides = {"image_encoder": {"image_size": size, "patch_size": max(8, size // 5)}} if size != 32 else {}
    budget = {"stream": 1.0}.get(spec["mode"], 4096.0)
    cfg = TrainConfig(out=spec["out"], model="test", model_overrides=overrides, pairs=[spec["csv"]],
                      batch_pairs=16, max_steps=spec["steps"], warmup_steps=1, num_workers=spec["workers"],
                      progress=False, threads=1, seed=0, cache_max_mb=budget,
                      decode_cache=spec.get("cache_dir") if spec["mode"] == "cache" else None)
    from ernie_vl.train.trainer import Trainer

    before = rss_mb()
    trainer = Trainer(cfg)
    if trainer.pairs is not None:  # workers wrote the rows; read each once (as an epoch does) so RSS counts them
        int(trainer.pairs.images.sum())
    ready = rss_mb()  # data in place, before the first step
    result = trainer.run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rss_before_mb": before, "rss_ready_mb": ready, "rss_peak_mb": peak, "steps": result.steps,
                      "streaming": trainer.streaming}))


if __name__ == "__main__":
    main()
