"""One reduced demo run per test session, shared by tests/test_demo_e2e.py and tests/test_examples.py.

The settings are ``DemoConfig.quick`` made smaller still (a few training steps, a few files per
split) so that the whole demo, every stage, runs in well under a minute of CPU.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from ernie_vl.app.demo import DemoConfig

_RUNS: dict[str, Any] = {}

REPO = Path(__file__).resolve().parents[1]


def small_config(out_dir: Path) -> DemoConfig:
    """Quick-sized demo with fewer files and steps (still every stage, the real trainer and model)."""
    return DemoConfig.quick(
        out_dir, max_train_steps=6, train_minutes=10.0, batch_pairs=16, batch_videos=8, checkpoint_every=3, eval_every=3,
        num_train_images=160, num_val_images=16, num_heldout_images=24, num_train_clips_per_class=3,
        num_val_clips_per_class=2, num_text_queries=2, num_videos=3, top_k=3, show_progress=False,
    )


def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    """(output folder, report) of the session's demo run, run on first use."""
    if "run" not in _RUNS:
        from ernie_vl.app.demo import run_demo

        out = tmp_path_factory.mktemp("demo")
        report = run_demo(small_config(out), log=lambda msg: None, print_summary=False)
        _RUNS["run"] = (out, report)
    return _RUNS["run"]


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    path = REPO / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
