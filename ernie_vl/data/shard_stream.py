"""Training and evaluation input from WebDataset shards: sharded across ranks and workers, buffer-shuffled,
resumable exactly.

``ShardBatches`` (an IterableDataset) is one consumer's endless stream of batches: consumer
``c`` of ``n = world_size x workers`` reads shards ``c, c+n, ...`` of each epoch's shuffled
shard order (or, with fewer shards than consumers, every shard keeping samples ``c mod n``),
passes the raw samples through a seeded shuffle buffer, decodes only what it emits, and
yields ``(uint8 images (B,3,S,S), captions, names, skipped [(name, reason)], raw samples used)``
(names are ``shard#key``);
one stacked tensor per batch crosses the process boundary. A malformed shard ends that shard (reported as
skipped, naming the shard and member); the stream goes on with the next.

``ShardSource`` is the trainer's step source (``next() -> DrawnStep``, ``state_dict``):
the DataLoader takes batches from its workers in turn, so the source knows which worker made
each batch and counts the raw samples (kept or skipped) each worker's consumed batches used;
on resume each worker replays that many samples of its stream without decoding, and the
sample order continues exactly (with the same worker count).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ernie_vl.data.shards import ShardError, decode_sample, iter_shard, shard_list


class ShardBatches(IterableDataset):
    """Endless (``epochs=None``) or finite batches of this rank's share of ``urls``; see the module docstring."""

    def __init__(self, urls: Sequence[str], preprocess: Callable, batch_size: int, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 1000, seed: int = 0, epochs: Optional[int] = None,
                 skip_samples: Sequence[int] = (), first_worker: int = 0, drop_last: bool = True) -> None:
        self.urls, self.preprocess, self.batch_size = list(urls), preprocess, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed, self.epochs = shuffle_buffer, seed, epochs
        self.skip_samples, self.first_worker, self.drop_last = list(skip_samples), first_worker, drop_last

    def _consumer(self) -> tuple[int, int, int]:
        """(consumer index, consumers, raw samples this worker replays without decoding on resume)."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # a resumed loader starts its round robin at worker 0: it plays the stream whose turn is next
        worker = (worker + self.first_worker) % workers
        skip = self.skip_samples[worker] if worker < len(self.skip_samples) else 0
        return self.rank * workers + worker, self.world_size * workers, skip

    def _raw(self, consumer: int, consumers: int, skipped: list) -> Iterator:
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            order = list(self.urls)
            if self.shuffle_buffer > 1:
                random.Random(self.seed * 100003 + epoch).shuffle(order)
            by_shard = len(order) >= consumers
            mine = order[consumer::consumers] if by_shard else order
            count = 0
            for url in mine:
                try:
                    for sample in iter_shard(url):
                        if by_shard or count % consumers == consumer:
                            yield sample
                        count += 1
                except ShardError as err:
                    skipped.append((err.shard, str(err)))
            epoch += 1

    def _shuffled(self, raw: Iterator, consumer: int) -> Iterator:
        if self.shuffle_buffer <= 1:
            yield from raw
            return
        rng = random.Random(self.seed * 7919 + consumer)
        buffer: list = []
        for sample in raw:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        consumer, consumers, skip = self._consumer()
        skipped: list[tuple[str, str]] = []
        stream = self._shuffled(self._raw(consumer, consumers, skipped), consumer)
        for _ in range(skip):  # resume: replay without decoding
            if next(stream, None) is None:
                return
        skipped.clear()  # reported by the run that consumed them
        images, captions, names, raw = [], [], [], 0
        for sample in stream:
            raw += 1
            item, reason = decode_sample(sample, self.preprocess)
            if item is None:
                skipped.append((sample.name, reason))
                continue
            images.append(item[0])
            captions.append(item[1])
            names.append(sample.name)
            if len(images) == self.batch_size:
                yield self._batch(images, captions, names, skipped, raw)
                images, captions, names, raw = [], [], [], 0
        if images and not self.drop_last:
            yield self._batch(images, captions, names, skipped, raw)
        elif skipped:
            yield None, [], [], list(skipped), raw

    def _batch(self, images: list, captions: list, names: list, skipped: list, raw: int) -> tuple:
        from ernie_vl.data.sources import Normaliser

        norm = Normaliser(tuple(self.preprocess.mean), tuple(self.preprocess.std))
        out = (torch.stack([norm.to_uint8(x) for x in images]), list(captions), list(names), list(skipped), raw)
        skipped.clear()
        return out


class ShardSource:
    """Image-text pairs streamed from shards (+ optional clips from a video source) per micro-step."""

    def __init__(self, mix: Any, rank: int, specs: Sequence[str], model: Any, num_workers: int = 2, seed: int = 0,
                 shuffle_buffer: int = 1000, videos: Any = None) -> None:
        from ernie_vl.data.sources import Normaliser

        self.mix, self.rank = mix, rank
        self.urls = shard_list(specs)
        self.preprocess, self.tokenizer = model.preprocess, model.tokenizer
        self.per_rank = mix.pairs // mix.world_size
        self.norm = Normaliser(tuple(model.preprocess.mean), tuple(model.preprocess.std))
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.videos = videos  # a MixedSource over clips only, or None
        self.pair_sampler = None  # streamed shards: no per-sample priorities
        self.video_sampler = getattr(videos, "video_sampler", None)
        self.workers = max(1, num_workers)
        self.consumed = 0  # batches taken from the loader
        self.raw_per_worker = [0] * self.workers  # raw samples behind each worker's consumed batches
        self.skipped: list[tuple[str, str]] = []
        self._iter = None

    def _loader(self) -> Iterator:
        data = ShardBatches(self.urls, self.preprocess, self.per_rank, self.rank, self.mix.world_size,
                            self.shuffle_buffer, self.seed, skip_samples=self.raw_per_worker,
                            first_worker=self.consumed % self.workers)
        return iter(DataLoader(data, batch_size=None, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0))

    def next(self) -> Any:
        from ernie_vl.data.mixing import DrawnStep
        from ernie_vl.data.sources import tokenize
        from ernie_vl.model import ErnieVLBatch

        if self._iter is None:
            self._iter = self._loader()
        while True:
            images, captions, _, skipped, raw = next(self._iter)
            self.raw_per_worker[self.consumed % self.workers] += raw
            self.consumed += 1
            self.skipped += skipped
            if images is not None:
                break
        fields: dict[str, Any] = {"images": self.norm.to_float(images), "texts": tokenize(self.tokenizer, captions)}
        video_ids = None
        if self.videos is not None:
            drawn = self.videos.next()
            video_ids = drawn.video_ids
            fields.update({k: getattr(drawn.batch, k) for k in ("videos", "video_labels", "video_texts")
                           if getattr(drawn.batch, k, None) is not None})
        pair_ids = torch.arange(self.mix.pairs)  # the step's pair count (no ids: a stream)
        return DrawnStep(ErnieVLBatch(**fields), pair_ids, video_ids)

    def take_skipped(self) -> list[tuple[str, str]]:
        out, self.skipped = self.skipped, []
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"shard_batches": self.consumed, "shard_samples": list(self.raw_per_worker)}
        if self.videos is not None:
            state["videos"] = self.videos.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raw = [int(n) for n in state["shard_samples"]]
        if len(raw) != self.workers:
            raise ValueError(f"the run streamed its shards with {len(raw)} workers; resume it with --num-workers "
                             f"{len(raw) if len(raw) > 1 else 0} to continue the same sample order")
        self.consumed, self.raw_per_worker = int(state["shard_batches"]), raw
        self._iter = None
        if self.videos is not None:
            self.videos.load_state_dict(state["videos"])


def decode_shards(specs: Sequence[str], preprocess: Callable, num_workers: int = 2, progress: bool = True
                  ) -> tuple[torch.Tensor, list[str], list[str], list[tuple[str, str]]]:
    """Every sample of the shards once, in a fixed order: (uint8 (N,3,S,S), captions, names, skipped)."""
    from tqdm import tqdm

    urls = shard_list(specs)
    data = ShardBatches(urls, preprocess, 256, shuffle_buffer=0, epochs=1, drop_last=False)
    workers = min(num_workers, len(urls))
    loader = DataLoader(data, batch_size=None, num_workers=workers)
    chunks, captions, names, skipped = [], [], [], []
    with tqdm(desc="decoding shards", unit="img", disable=not progress, leave=False) as bar:
        for images, caps, keys, bad, _ in loader:
            skipped += bad
            if images is not None:
                chunks.append(images)
                captions += caps
                names += keys
                bar.update(len(caps))
    if not chunks:
        raise ValueError(f"no readable samples in the shards {urls[:3]}{'...' if len(urls) > 3 else ''}; "
                         f"e.g. {skipped[:2]}")
    return torch.cat(chunks), captions, names, skipped
