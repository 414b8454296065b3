"""Gather the latest figures of every benchmark into BENCHMARKS.md.

Each ``bench/<name>.py`` writes ``bench/results/<name>.md`` (its command line
first, then its tables); this script concatenates them under a fixed order.

    python bench/collect.py
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ORDER = ("summary", "encoders", "moe", "quantize", "video", "retrieval", "hnsw_at_scale", "server", "priority_sampling", "train_synthetic", "train_screens")

HEADER = """# Benchmarks

Latest figures, each with the command that produced it. Every benchmark times
ours and its anchor in the same process (interleaved rounds, medians) and
prints the ratio. Unless a section says otherwise: CPU only, 2 threads, on the
project's 2-core machine. Regenerate one section with its command, then
`python bench/collect.py`.
"""


def main() -> None:
    files = {p.stem: p for p in RESULTS.glob("*.md")}
    names = [n for n in ORDER if n in files] + sorted(set(files) - set(ORDER))
    parts = [HEADER]
    for name in names:
        parts.append(files[name].read_text().strip() + "\n")
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"BENCHMARKS.md: {len(names)} sections ({', '.join(names)})")


if __name__ == "__main__":
    main()
