"""A resumable stage runner: each stage runs once, records its result, and a failure never stops the others.

State lives in ``OUT/demo_state.json``. A stage is skipped on a rerun when it finished
before with the same fingerprint (its parameters plus the fingerprints of the stages it
needs) and the files it declared still exist. A stage whose prerequisite failed is marked
``skipped``; every other stage still runs, and the failure (message and traceback) is kept
for the report.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tqdm.auto import tqdm

STATE_FILE = "demo_state.json"
STATE_VERSION = 1

# Stage outcomes.
DONE = "done"          # ran now and finished
CACHED = "cached"      # finished in an earlier run with the same inputs; result reused
FAILED = "failed"      # raised; the error is recorded
SKIPPED = "skipped"    # a stage it needs did not finish
OK_STATUSES = (DONE, CACHED)


@dataclass
class Stage:
    """One step of the demo.

    ``func(ctx)`` does the work and returns a JSON-serialisable dict (its result, read by
    later stages through ``ctx.results[name]``). ``requires`` names stages that must have
    finished; ``params`` are the inputs that decide whether an earlier result can be reused;
    ``outputs`` are paths (relative to the output folder) that must exist for that reuse.
    """

    name: str
    title: str
    func: Callable[["StageContext"], dict]
    requires: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    cacheable: bool = True


@dataclass
class StageRecord:
    """What happened to one stage in this run (saved in the state file and the report)."""

    name: str
    title: str
    status: str
    seconds: float = 0.0
    result: dict = field(default_factory=dict)
    error: Optional[str] = None
    traceback: Optional[str] = None
    fingerprint: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name, "title": self.title, "status": self.status,
            "seconds": round(self.seconds, 3), "result": self.result, "error": self.error,
            "traceback": self.traceback, "fingerprint": self.fingerprint,
        }


class StageContext:
    """What a stage sees: the output folder, the results of earlier stages, a progress bar factory."""

    def __init__(self, out_dir: Path, results: dict[str, dict], position: str, title: str,
                 show_progress: bool) -> None:
        self.out_dir = out_dir
        self.results = results
        self._prefix = f"{position} {title}"
        self._show_progress = show_progress
        self._bars: list[tqdm] = []

    def bar(self, total: Optional[float] = None, unit: str = "it", desc: str = "") -> tqdm:
        """A tqdm bar labelled with this stage (closed by the runner when the stage ends)."""
        label = f"{self._prefix}: {desc}" if desc else self._prefix
        bar = tqdm(total=total, unit=unit, desc=label, disable=not self._show_progress,
                   dynamic_ncols=True, leave=True, file=sys.stderr)
        self._bars.append(bar)
        return bar

    @property
    def show_progress(self) -> bool:
        """Whether stages should let the libraries they call draw their own bars."""
        return self._show_progress

    @property
    def label(self) -> str:
        return self._prefix

    def close_bars(self) -> None:
        for bar in self._bars:
            bar.close()
        self._bars.clear()


def _fingerprint(stage: Stage, upstream: Sequence[str]) -> str:
    payload = json.dumps({"name": stage.name, "params": stage.params, "upstream": list(upstream)},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _json_safe(value: Any) -> Any:
    """Round-trip through JSON so a result that cannot be saved fails inside its own stage."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"stage result holds a {type(value).__name__}, which JSON cannot store")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class StageRunner:
    """Runs stages in order in ``out_dir``; reuses finished ones; records failures and goes on."""

    def __init__(self, out_dir: Path | str, show_progress: bool = True, resume: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.show_progress = show_progress
        self.resume = resume
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.state_path = self.out_dir / STATE_FILE
        self._saved: dict[str, dict] = self._load_state() if resume else {}

    def _load_state(self) -> dict[str, dict]:
        if not self.state_path.exists():
            return {}
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            self.log(f"note: ignoring unreadable {self.state_path} ({err}); every stage runs again")
            return {}
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            return {}
        stages = data.get("stages", {})
        return stages if isinstance(stages, dict) else {}

    def _save_state(self, records: dict[str, StageRecord]) -> None:
        stages = dict(self._saved)
        stages.update({name: rec.to_dict() for name, rec in records.items()})
        write_json_atomic(self.state_path, {"version": STATE_VERSION, "stages": stages})

    def _reusable(self, stage: Stage, fingerprint: str) -> Optional[dict]:
        saved = self._saved.get(stage.name)
        if not stage.cacheable or not saved or saved.get("status") not in OK_STATUSES:
            return None
        if saved.get("fingerprint") != fingerprint:
            return None
        if not all((self.out_dir / rel).exists() for rel in stage.outputs):
            return None
        return saved

    def run(self, stages: Sequence[Stage]) -> list[StageRecord]:
        """Run every stage; returns one record per stage in order."""
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        records: dict[str, StageRecord] = {}
        results: dict[str, dict] = {}
        fingerprints: dict[str, str] = {}
        for position, stage in enumerate(stages, start=1):
            unknown = [r for r in stage.requires if r not in names[: position - 1]]
            if unknown:
                raise ValueError(f"stage {stage.name!r} requires {unknown}, which do not run before it")
            fingerprint = _fingerprint(stage, [fingerprints[r] for r in stage.requires])
            fingerprints[stage.name] = fingerprint
            tag = f"[{position}/{len(stages)}]"
            record = StageRecord(stage.name, stage.title, SKIPPED, fingerprint=fingerprint)
            missing = [r for r in stage.requires if records[r].status not in OK_STATUSES]
            saved = self._reusable(stage, fingerprint) if self.resume else None
            if missing:
                record.error = f"needs {', '.join(missing)}, which did not finish"
                self.log(f"{tag} {stage.title}: skipped ({record.error})")
            elif saved is not None:
                record.status = CACHED
                record.result = saved.get("result", {})
                record.seconds = float(saved.get("seconds", 0.0))
                results[stage.name] = record.result
                self.log(f"{tag} {stage.title}: done in an earlier run, reused")
            else:
                record = self._run_one(stage, record, results, tag)
            records[stage.name] = record
            self._save_state(records)
        return [records[n] for n in names]

    def _run_one(self, stage: Stage, record: StageRecord, results: dict[str, dict], tag: str) -> StageRecord:
        ctx = StageContext(self.out_dir, results, tag, stage.title, self.show_progress)
        self.log(f"{tag} {stage.title} ...")
        start = time.perf_counter()
        try:
            result = stage.func(ctx)
            record.result = _json_safe(result if result is not None else {})
            record.status = DONE
            results[stage.name] = record.result
        except KeyboardInterrupt:
            ctx.close_bars()
            record.status = FAILED
            record.error = "interrupted"
            record.seconds = time.perf_counter() - start
            raise
        except Exception as err:  # one broken stage must not stop the demo; it is reported
            record.status = FAILED
            record.error = f"{type(err).__name__}: {err}"
            record.traceback = traceback.format_exc()
        finally:
            ctx.close_bars()
            record.seconds = time.perf_counter() - start
        if record.status == FAILED:
            self.log(f"{tag} {stage.title}: FAILED after {record.seconds:.1f}s: {record.error}")
        else:
            self.log(f"{tag} {stage.title}: done in {record.seconds:.1f}s")
        return record
