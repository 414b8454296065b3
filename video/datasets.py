"""Labelled video datasets (Kinetics folder layout or a CSV) that never stop an epoch on a bad file.

An item is ``(clip (T,3,H,W) float32, label int)``, or ``None`` when the file
cannot be decoded; the failure is counted and listed in ``dataset.failures``,
also when it happened inside a DataLoader worker process (the log is a small
append-only file shared by the workers). Batch with :func:`collate_skip_none` (``retrieval.datasets``).
"""
from __future__ import annotations

import csv
import json
import os
import tempfile
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from retrieval.datasets import collate_skip_none  # noqa: F401  (re-exported: video.collate_skip_none)
from video.decode import open_video
from video.errors import VideoDecodeError
from video.sampling import SampledClip, build_sampler
from video.transforms import ClipTransform, build_clip_transform

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")


@dataclass(frozen=True)
class VideoFailure:
    """A file that could not be turned into a clip, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class ConcealedClip:
    """A clip made although some of its frames did not decode: ``frames`` were replaced by neighbours."""

    path: str
    frames: list[int]


def _remove_if_owner(path: str, owner: int) -> None:
    if os.getpid() == owner:
        try:
            os.remove(path)
        except OSError:
            pass


class FailureLog:
    """Failures recorded by any process that holds a copy (DataLoader workers included).

    Each failure is one JSON line appended (O_APPEND) to a temporary file owned
    by the process that created the log, removed when that log is collected.
    """

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="video-failures-", suffix=".jsonl")
        os.close(fd)
        self.owner = os.getpid()
        self._finalizer = weakref.finalize(self, _remove_if_owner, self.path, self.owner)

    def __getstate__(self) -> dict:
        return {"path": self.path, "owner": self.owner}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self.owner = state["owner"]
        self._finalizer = None

    def record(self, path: str, reason: str) -> None:
        self._append({"path": path, "reason": reason})

    def _append(self, entry: dict) -> None:
        line = json.dumps(entry) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def _lines(self) -> list[dict]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
        except FileNotFoundError:
            return []

    def entries(self) -> list[VideoFailure]:
        return [VideoFailure(**entry) for entry in self._lines()]

    def clear(self) -> None:
        open(self.path, "w").close()


class ConcealLog(FailureLog):
    """Clips that needed concealment, recorded like failures (any process, one JSON line each)."""

    def record(self, path: str, frames: Sequence[int]) -> None:  # type: ignore[override]
        self._append({"path": path, "frames": [int(i) for i in frames]})

    def entries(self) -> list[ConcealedClip]:  # type: ignore[override]
        return [ConcealedClip(**entry) for entry in self._lines()]


class VideoClipDataset(Dataset):
    """Shared machinery: (path, label) samples -> sampled, decoded, transformed clips.

    ``num_frames``: frames per clip (T). ``sampling``: "tsn", "uniform" or "dense"
    (``stride`` for dense). ``train`` picks random sampling/augmentation.
    ``transform``: a :class:`~video.transforms.ClipTransform` or any callable
    taking uint8 frames (T,H,W,3) and returning float (T,3,H,W); default: the
    CLIP-style transform at ``image_size``. ``backend``/``timeout_s``/``isolation``/``max_concealed``
    go to :func:`video.open_video`. Clips that needed concealment (frames that did not decode,
    replaced by neighbours) are counted in ``dataset.concealed``; files that failed in ``failures``.
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], num_frames: int, sampling: str = "tsn",
                 train: bool = False, transform: Callable | None = None, stride: int = 2, backend: str = "auto",
                 timeout_s: float = 30.0, image_size: int = 224, seed: int = 0, isolation: str = "auto",
                 max_concealed: float = 0.25) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.num_frames = int(num_frames)
        self.sampling = sampling
        self.train = bool(train)
        self.sampler = build_sampler(sampling, self.num_frames, train=self.train, stride=stride)
        self.transform = transform if transform is not None else build_clip_transform(train=self.train, image_size=image_size)
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self.isolation = isolation
        self.seed = int(seed)
        self.max_concealed = float(max_concealed)
        self.failure_log = FailureLog()
        self.conceal_log = ConcealLog()

    # -- bookkeeping --------------------------------------------------------
    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    @property
    def failures(self) -> list[VideoFailure]:
        """Every failed load so far (from all worker processes), in the order they happened."""
        return self.failure_log.entries()

    @property
    def concealed(self) -> list[ConcealedClip]:
        """Every clip made with concealed frames so far (from all worker processes)."""
        return self.conceal_log.entries()

    def open(self, path: str):
        """``video.open_video`` with this dataset's decoding options."""
        return open_video(path, backend=self.backend, timeout_s=self.timeout_s, isolation=self.isolation,
                          max_concealed=self.max_concealed)

    def note_concealed(self, path: str, frames: Sequence[int]) -> None:
        if frames:
            self.conceal_log.record(path, frames)

    def concealment_report(self) -> dict:
        """{"clips": clips with concealed frames, "frames": frames concealed, "files": [{"path", "frames"}]}."""
        entries = self.concealed
        return {"clips": len(entries), "frames": sum(len(e.frames) for e in entries),
                "files": [asdict(e) for e in entries]}

    def failure_report(self) -> dict:
        """{"count": failed loads, "files": [{"path", "reason"}] (one per file)} for a run's report."""
        entries = self.failures
        unique: dict[str, VideoFailure] = {}
        for entry in entries:
            unique.setdefault(entry.path, entry)
        return {"count": len(entries), "files": [asdict(f) for f in unique.values()]}

    def save_class_index(self, path: str | os.PathLike) -> None:
        """Write {class name: index} as JSON."""
        from retrieval.names import json_text

        Path(path).write_text(json_text(self.class_to_idx, indent=2) + "\n", encoding="utf-8")

    def __len__(self) -> int:
        return len(self.samples)

    # -- loading ------------------------------------------------------------
    def _generator(self, index: int) -> torch.Generator:
        g = torch.Generator()
        if self.train:  # the global RNG differs per DataLoader worker and epoch
            g.manual_seed(int(torch.randint(2**62, (1,)).item()))
        else:
            g.manual_seed(self.seed * 1_000_003 + index)
        return g

    def _apply_transform(self, frames: torch.Tensor, generator: torch.Generator, crop_index: int = 0,
                         num_crops: int = 1) -> torch.Tensor:
        if isinstance(self.transform, ClipTransform):
            return self.transform(frames, generator=generator, crop_index=crop_index, num_crops=num_crops)
        return self.transform(frames)

    def load_frames(self, index: int, view: int = 0, num_views: int = 1,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, SampledClip]:
        """Decoded frames uint8 (T,H,W,3) of temporal view ``view`` and the sampled indices/times."""
        path, _ = self.samples[index]
        with self.open(path) as reader:
            clip = self.sampler(len(reader), fps=reader.fps, frame_times=None, generator=generator,
                                view=view, num_views=num_views)
            times = reader.timestamps(clip.indices)
            frames = reader.get_frames(clip.indices)
            return frames, SampledClip(clip.indices, times, tuple(reader.last_concealed))

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        generator = self._generator(index)
        try:
            frames, sampled = self.load_frames(index, generator=generator)
            clip = self._apply_transform(frames, generator)
            self.note_concealed(path, sampled.concealed)
        except (VideoDecodeError, OSError, RuntimeError, ValueError) as err:
            reason = err.reason if isinstance(err, VideoDecodeError) else f"{type(err).__name__}: {err}"
            self.failure_log.record(path, reason)
            return None
        return clip.float(), int(label)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} videos, {len(self.classes)} classes, T={self.num_frames}, "
                f"sampling={self.sampling!r}, train={self.train})")


def _is_video(path: Path, extensions: Sequence[str]) -> bool:
    return path.is_file() and path.suffix.lower() in extensions and not path.name.startswith(".")


class VideoFolder(VideoClipDataset):
    """Videos in ``ROOT/<class name>/<file>`` (Kinetics layout); classes sorted by name.

    ``classes`` fixes the class list (e.g. the model's labels); folders not in it are an error.
    """

    def __init__(self, root: str | os.PathLike, num_frames: int = 8, sampling: str = "tsn", train: bool = False,
                 transform: Callable | None = None, extensions: Sequence[str] = VIDEO_EXTENSIONS,
                 classes: Sequence[str] | None = None, **kwargs) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"video folder {str(self.root)!r} does not exist or is not a folder")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            class_list = found
        else:
            class_list = list(classes)
            unknown = sorted(set(found) - set(class_list))
            if unknown:
                raise ValueError(f"folders {unknown[:5]} under {str(self.root)!r} are not among the given classes")
        if not class_list:
            raise ValueError(f"no class folders under {str(self.root)!r}; expected ROOT/<class>/<video file>")
        exts = tuple(e.lower() for e in extensions)
        samples = []
        for idx, name in enumerate(class_list):
            folder = self.root / name
            if folder.is_dir():
                samples += [(str(p), idx) for p in sorted(folder.iterdir()) if _is_video(p, exts)]
        if not samples:
            raise ValueError(f"no video files ({', '.join(exts)}) in the class folders under {str(self.root)!r}")
        super().__init__(samples, class_list, num_frames, sampling=sampling, train=train, transform=transform, **kwargs)


class VideoCSV(VideoClipDataset):
    """Videos listed in a CSV with a header (columns ``path`` and ``label``; names settable).

    Paths are relative to the CSV's folder. Labels are class names, or integer
    indices; ``classes`` fixes the class list (default: sorted names, or "0".."N-1").
    """

    def __init__(self, path: str | os.PathLike, num_frames: int = 8, sampling: str = "tsn", train: bool = False,
                 transform: Callable | None = None, path_col: str = "path", label_col: str = "label",
                 classes: Sequence[str] | None = None, **kwargs) -> None:
        self.csv_path = Path(path)
        if not self.csv_path.is_file():
            raise ValueError(f"CSV file {str(self.csv_path)!r} does not exist")
        with open(self.csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            for col in (path_col, label_col):
                if col not in columns:
                    raise ValueError(f"CSV {str(self.csv_path)!r} has no column {col!r}; columns: {columns}")
            rows = [(r[path_col], (r[label_col] or "").strip()) for r in reader]
        if not rows:
            raise ValueError(f"CSV {str(self.csv_path)!r} lists no videos")
        base = self.csv_path.parent
        labels = [label for _, label in rows]
        if classes is not None:
            class_list = list(classes)
        elif all(label.lstrip("-").isdigit() for label in labels):
            class_list = [str(i) for i in range(max(int(label) for label in labels) + 1)]
        else:
            class_list = sorted(set(labels))
        lookup = {name: i for i, name in enumerate(class_list)}
        samples = []
        for line, (rel, label) in enumerate(rows, start=2):
            if label in lookup:
                idx = lookup[label]
            elif label.isdigit() and int(label) < len(class_list):
                idx = int(label)
            else:
                raise ValueError(f"{str(self.csv_path)!r} line {line}: label {label!r} is not a known class "
                                 f"(classes: {class_list[:10]}{'...' if len(class_list) > 10 else ''})")
            samples.append((str(base / rel), idx))
        super().__init__(samples, class_list, num_frames, sampling=sampling, train=train, transform=transform, **kwargs)
