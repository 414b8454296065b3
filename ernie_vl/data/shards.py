"""WebDataset tar shards of image-text pairs: brace-expanded shard lists, a checked sample iterator, a writer.

The format is img2dataset's and open_clip's: consecutive tar members that share a key (the
member name up to its first dot, folders included) form one sample, e.g. ``000123.jpg`` +
``000123.txt`` (or ``.json`` with a ``caption``/``text`` field). Images are ``.jpg``,
``.jpeg``, ``.png`` or ``.webp``. Read with :mod:`tarfile` in stream mode (no index, no
seeking). A shard that cannot be read raises :class:`ShardError` naming the shard and the
last member read; a sample without an image or a caption is reported by the iterator as a
skipped item naming the shard and the key, never raised.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "json")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACES = re.compile(r"\{([^{}]*)\}")


class ShardError(ValueError):
    """A tar shard that cannot be read; ``shard`` and ``member`` name where."""

    def __init__(self, shard: str, member: Optional[str], reason: str) -> None:
        self.shard, self.member, self.reason = shard, member, reason
        where = f"after member {member!r}" if member else "at its start"
        super().__init__(f"malformed shard {shard!r} {where}: {reason}")


def expand_braces(pattern: str) -> list[str]:
    """``a/{00000..00002}.tar`` -> 3 names (zero padding kept), ``{x,y}`` -> alternatives; nested left to right."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = _RANGE.fullmatch(m.group(0))
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"shard pattern {pattern!r}: braces hold a range {{000..099}} or a list {{a,b}}, got "
                         f"{m.group(0)!r}")
    return [out for option in options for out in expand_braces(head + option + tail)]


def is_shard_spec(spec: str) -> bool:
    """True for a ``.tar`` file or a brace pattern of them (as opposed to a CSV)."""
    return str(spec).endswith(".tar") or (".tar" in str(spec) and "{" in str(spec))


def shard_list(specs: Sequence[str] | str) -> list[str]:
    """Every shard named by ``specs`` (brace-expanded, in order); a missing file is a ValueError naming it."""
    specs = [specs] if isinstance(specs, (str, Path)) else list(specs)
    urls = [u for spec in specs for u in expand_braces(str(spec))]
    if not urls:
        raise ValueError(f"no shards in {specs}")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise ValueError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[:3]}")
    return urls


@dataclass
class RawSample:
    """One key's members: ``files`` extension -> bytes; ``shard`` and ``key`` name it."""

    shard: str
    key: str
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.shard}#{self.key}"

    def image_bytes(self) -> Optional[bytes]:
        return next((self.files[e] for e in IMAGE_EXTS if e in self.files), None)

    def caption(self) -> Optional[str]:
        """The caption (``.txt``, else ``.json``'s ``caption`` / ``text``); ValueError when it cannot be read."""
        if "txt" in self.files:
            return self.files["txt"].decode("utf-8").strip()
        if "json" in self.files:
            meta = json.loads(self.files["json"].decode("utf-8"))
            text = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
            return text.strip() if isinstance(text, str) else None
        return None


def _split_name(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def iter_shard(shard: str) -> Iterator[RawSample]:
    """The samples of one shard in member order; :class:`ShardError` when the tar cannot be read."""
    last: Optional[str] = None
    current: Optional[RawSample] = None
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                if _skip_key(key):
                    continue  # webdataset metadata and hidden files
                data = tar.extractfile(member).read()
                last = member.name
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(shard, key)
                current.files[ext] = data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ShardError(shard, last, f"{type(err).__name__}: {err}") from err
    if current is not None:
        yield current


def decode_sample(sample: RawSample, preprocess) -> tuple[Optional[tuple], Optional[str]]:
    """((pixels from ``preprocess``, caption), None) or (None, reason naming the shard and key)."""
    from retrieval.images import ImageLoadError, load_image_bytes

    data = sample.image_bytes()
    if data is None:
        return None, f"no image member ({'/'.join(IMAGE_EXTS)}) for key {sample.key!r}"
    try:
        caption = sample.caption()
    except (UnicodeDecodeError, ValueError) as err:
        return None, f"unreadable caption of key {sample.key!r}: {type(err).__name__}: {err}"
    if not caption:
        return None, "empty caption" if caption is not None else f"no caption member (txt/json) for key {sample.key!r}"
    try:
        pixels = preprocess(load_image_bytes(data, name=sample.name))
    except ImageLoadError as err:
        return None, err.reason
    except Exception as err:  # a transform that chokes on one odd image must not stop the job
        return None, f"{type(err).__name__}: {err}"
    return (pixels, caption), None


def write_shards(csv_path: str | Path, out_dir: str | Path, per_shard: int = 10000, image_col: str = "filepath",
                 caption_col: str = "caption", progress: bool = True) -> dict:
    """Write the pairs of a CSV as ``OUT/00000.tar``, ... (``{key}.{image ext}`` + ``{key}.txt``).

    Image bytes are copied as they are (no re-encoding); rows with a missing or non-image file or an
    empty caption are skipped and listed. Each shard is written to a temporary name and renamed.
    Returns ``{"shards": [...], "samples": n, "skipped": [(path, reason)], "pattern": "OUT/{00000..0000K}.tar"}``.
    """
    from tqdm import tqdm

    from ernie_vl.data.pairs import PairList

    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    listed = PairList.from_csvs([csv_path], image_col, caption_col)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skipped = list(listed.skipped)
    shards: list[str] = []
    tar, count, written = None, 0, 0

    def close() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            os.replace(tmp, final)
            shards.append(str(final))
            tar = None

    for path, caption in tqdm(list(zip(listed.paths, listed.captions)), desc="writing shards", unit="pair",
                              disable=not progress):
        ext = Path(path).suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            skipped.append((path, f"not a {'/'.join(IMAGE_EXTS)} file"))
            continue
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            skipped.append((path, f"{type(err).__name__}: {err.strerror or err}"))
            continue
        if tar is None:
            final = out / f"{len(shards):05d}.tar"
            tmp = out / f".{final.name}.tmp-{os.getpid()}"
            tar, count = tarfile.open(tmp, "w"), 0
        key = f"{written:09d}"
        for name, blob in ((f"{key}.{'jpg' if ext == 'jpeg' else ext}", data), (f"{key}.txt", caption.encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(blob), 0, 0o644
            tar.addfile(info, io.BytesIO(blob))
        count += 1
        written += 1
        if count == per_shard:
            close()
    close()
    if not shards:
        raise ValueError(f"no pairs of {str(csv_path)!r} could be written; e.g. {skipped[:3]}")
    last = len(shards) - 1
    pattern = str(out / (f"{{00000..{last:05d}}}.tar" if last else "00000.tar"))
    return {"shards": shards, "samples": written, "skipped": skipped, "pattern": pattern}


SAMPLE_SEP = "#"  # a sample's name: "<shard>#<key>", as RawSample.name writes it


def _skip_key(key: str) -> bool:
    return key.startswith("__") or key.split("/")[-1].startswith(".")


def shard_sample_names(shard: str) -> list[str]:
    """``<shard>#<key>`` of every sample in member order, reading the tar headers only (seeking past data)."""
    keys: dict[str, None] = {}
    last: Optional[str] = None
    try:
        with tarfile.open(shard, mode="r:*") as tar:
            for member in tar:
                if member.isfile():
                    key, _ = _split_name(member.name)
                    last = member.name
                    if not _skip_key(key):
                        keys.setdefault(key, None)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ShardError(shard, last, f"{type(err).__name__}: {err}") from err
    return [f"{shard}{SAMPLE_SEP}{key}" for key in keys]


class ShardImageOpener:
    """``opener("<shard>#<key>") -> PIL.Image``: random access into tar shards (one open shard cached).

    Picklable (DataLoader workers each open their own). Raises ``ImageLoadError`` naming the sample.
    """

    def __init__(self) -> None:
        self._shard: Optional[str] = None
        self._tar: Optional[tarfile.TarFile] = None
        self._members: dict[str, dict[str, tarfile.TarInfo]] = {}

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def _open(self, shard: str) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar, self._shard, self._members = tarfile.open(shard, mode="r:*"), shard, {}
        for member in self._tar.getmembers():
            if member.isfile():
                key, ext = _split_name(member.name)
                self._members.setdefault(key, {})[ext] = member

    def __call__(self, name: str):
        from retrieval.images import ImageLoadError, load_image_bytes

        shard, sep, key = str(name).rpartition(SAMPLE_SEP)
        if not sep:
            raise ImageLoadError(name, f"not a '<shard>{SAMPLE_SEP}<key>' sample name")
        try:
            if shard != self._shard:
                self._open(shard)
            files = self._members.get(key, {})
            member = next((files[e] for e in IMAGE_EXTS if e in files), None)
            if member is None:
                raise ImageLoadError(name, f"no image member ({'/'.join(IMAGE_EXTS)}) for key {key!r}")
            data = self._tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            self._shard = None
            raise ImageLoadError(name, f"unreadable shard: {type(err).__name__}: {err}") from err
        return load_image_bytes(data, name=name)
