"""The HTTP server on loopback: endpoints, dynamic batching, refusals of bad requests, and the
exactness of the serving shortcuts (text batches trimmed to their longest sequence; one batched
forward + index search per search batch) against the plain per-request path."""
from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import ernie_vl
from ernie_vl.app.serve import BatchingConfig, DynamicBatcher, ServerConfig, ServerThread, create_app
from ernie_vl.app.serve.text_trim import trim_padding, trimming_is_exact
from retrieval.embed import encode_text_batch
from retrieval.folder import index_folder
from retrieval.index import Index

from _retrieval_helpers import ColorModel, write_color_image


def _png(rgb, size=(10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


@contextmanager
def worker_held_until_submitted(service, counts: dict):
    """Hold the model worker thread until every named batcher has had ``counts[name]`` items
    submitted, then let it run: all those items are queued before the first batch runs, whatever
    the timing of the requests (no reliance on arrival within ``max_wait_ms``)."""
    gate, holding = threading.Event(), threading.Event()
    service.executor.submit(lambda: (holding.set(), gate.wait(120)))
    assert holding.wait(30), "the worker thread did not start"
    batchers = {b.name: b for b in service.batchers}

    def release_when_all_submitted():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(batchers[n].submitted < c for n, c in counts.items()):
            time.sleep(0.005)
        gate.set()

    waiter = threading.Thread(target=release_when_all_submitted, daemon=True)
    waiter.start()
    try:
        yield
    finally:
        gate.set()
        waiter.join(5)


@pytest.fixture()
def served(tmp_path):
    root = tmp_path / "photos"
    for name, rgb in {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}.items():
        write_color_image(root / f"{name}.png", rgb)
    model = ColorModel()
    index, _ = index_folder(model, root, model_id=model.model_id, progress=False)
    config = ServerConfig(batching=BatchingConfig(max_batch_size=8, max_wait_ms=50), max_upload_bytes=20_000)
    app = create_app(model, model.preprocess, model.tokenizer, model.model_id, index, config)
    with ServerThread(app) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, model, app.state.service


def test_health_and_embeddings(served):
    client, model, _ = served
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model_id"] == "test:color"
    assert health["index"] == {"count": 3, "kind": "flat", "embedding_dim": 3}
    r = client.post("/embed/text", json={"texts": ["red", "blue"]})
    assert r.status_code == 200
    emb = np.array(r.json()["embeddings"])
    np.testing.assert_allclose(emb, [[1, 0, 0], [0, 0, 1]], atol=1e-2)
    r = client.post("/embed/image", files=[("file", ("g.png", _png((0, 255, 0)), "image/png"))])
    assert r.status_code == 200 and r.json()["dim"] == 3
    np.testing.assert_allclose(r.json()["embeddings"][0], [0, 1, 0], atol=1e-4)


def test_search_by_text_and_image(served):
    client, _, _ = served
    r = client.post("/search", json={"text": "a green field", "k": 2})
    assert r.status_code == 200
    hits = r.json()["hits"]
    assert len(hits) == 2 and hits[0]["metadata"]["path"] == "green.png"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    r = client.post("/search", files={"image": ("q.png", _png((0, 0, 250)), "image/png")}, data={"k": "1"})
    assert r.status_code == 200
    assert [h["metadata"]["path"] for h in r.json()["hits"]] == ["blue.png"]


@pytest.mark.parametrize("kwargs,status,needle", [
    (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
    (dict(json={"k": 3}), 422, "text"),
    (dict(json={"text": "red", "k": 0}), 422, "k must be"),
    (dict(json={"text": "red", "k": "many"}), 422, "k must be"),
    (dict(json={"text": ""}), 422, "non-empty"),
    (dict(json=["red"]), 422, "object"),
])
def test_bad_search_requests_get_4xx(served, kwargs, status, needle):
    client, _, _ = served
    r = client.post("/search", **kwargs)
    assert r.status_code == status and needle in r.json()["error"]


def test_bad_uploads_are_refused_and_server_survives(served):
    client, _, _ = served
    r = client.post("/embed/image", files={"file": ("x.png", b"this is text, not a picture", "image/png")})
    assert r.status_code == 415 and "x.png" in r.json()["error"]
    r = client.post("/embed/image", files={"file": ("big.png", b"\x00" * 30_000, "image/png")})
    assert r.status_code == 413
    r = client.post("/embed/image", data={"note": "no file"})
    assert r.status_code == 422
    r = client.post("/embed/text", json={"texts": ["x"] * 65})
    assert r.status_code == 413
    r = client.get("/nowhere")
    assert r.status_code == 404
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/embed/text", json={"text": "red"}).status_code == 200


def test_concurrent_requests_are_batched(served):
    client, model, service = served
    model.text_batch_sizes.clear()
    url = str(client.base_url)

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=30) as ac:
            return await asyncio.gather(*(ac.post("/embed/text", json={"text": f"blue {i}"}) for i in range(16)))

    with worker_held_until_submitted(service, {"text": 16}):
        responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    for r in responses:
        np.testing.assert_allclose(r.json()["embeddings"][0], [0, 0, 1], atol=1e-2)
    # all 16 were queued before the first forward: after the first batch (whatever it gathered),
    # the rest fill batches of max_batch_size, never more
    assert sum(model.text_batch_sizes) == 16
    assert max(model.text_batch_sizes) == 8
    assert len(model.text_batch_sizes) <= 3
    stats = client.get("/health").json()["stats"]["text"]
    assert stats["items"] >= 16 and stats["max_batch"] <= 8


def test_batcher_unit_limits_and_errors():
    calls: list[list[int]] = []

    def double(items):
        calls.append(list(items))
        if -1 in items:
            raise ValueError("bad item")
        return [2 * i for i in items]

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = DynamicBatcher(double, BatchingConfig(max_batch_size=4, max_wait_ms=20), ex)
            await b.start()
            out = await asyncio.gather(*(b.submit(i) for i in range(10)))
            with pytest.raises(ValueError, match="bad item"):
                await b.submit(-1)
            after = await b.submit(5)   # the loop survives a failing batch
            off = DynamicBatcher(double, BatchingConfig(max_batch_size=1), ex)
            await off.start()
            await asyncio.gather(*(off.submit(i) for i in range(3)))
            await b.stop()
            await off.stop()
            return out, after

    out, after = asyncio.run(main())
    assert out == [2 * i for i in range(10)] and after == 10
    assert [len(c) for c in calls[:3]] == [4, 4, 2]
    assert [len(c) for c in calls[-3:]] == [1, 1, 1]
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchingConfig(max_batch_size=0)


def test_lone_client_never_waits_for_a_batch(monkeypatch):
    waits = []
    real_wait_for = asyncio.wait_for

    async def counting_wait_for(aw, timeout):
        waits.append(timeout)
        return await real_wait_for(aw, timeout)

    monkeypatch.setattr(asyncio, "wait_for", counting_wait_for)

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = DynamicBatcher(lambda items: [i + 1 for i in items], BatchingConfig(max_batch_size=8, max_wait_ms=500), ex)
            await b.start()
            sequential = [await b.submit(i) for i in range(5)]   # one request at a time
            assert not waits
            burst = await asyncio.gather(*(b.submit(i) for i in range(3)))
            await b.stop()
            return sequential, burst, b.stats

    sequential, burst, stats = asyncio.run(main())
    assert sequential == [1, 2, 3, 4, 5] and burst == [1, 2, 3]
    assert stats.batches == 6 and stats.max_batch == 3


TEXTS = ["a dog", "two red cars parked on a narrow street next to a bridge", "snow", "a cat on a blue sofa"]


@pytest.fixture(scope="module")
def ernie_model():
    torch.manual_seed(0)
    return ernie_vl.create_model("test").eval()


def test_trim_padding_cuts_only_all_padding_columns():
    tokens = torch.tensor([[5, 7, 9, 0, 0, 0], [5, 8, 0, 0, 0, 0]])
    assert trim_padding(tokens).tolist() == [[5, 7, 9], [5, 8, 0]]
    assert trim_padding(tokens, pad_id=9).shape == (2, 6)          # a column of 9 is not padding for pad 0
    assert trim_padding(torch.zeros(2, 4, dtype=torch.long)).shape == (2, 1)
    with pytest.raises(TypeError, match="token tensor"):
        trim_padding(torch.zeros(4, dtype=torch.long))


def test_trimmed_text_batch_matches_full_context(ernie_model):
    model = ernie_model
    tokens = model.tokenizer(TEXTS)
    trimmed = trim_padding(tokens)
    assert trimmed.shape[1] < tokens.shape[1]
    full, short = encode_text_batch(model, tokens), encode_text_batch(model, trimmed)
    torch.testing.assert_close(short, full, rtol=0, atol=1e-5)
    assert trimming_is_exact(lambda t: encode_text_batch(model, t), model.tokenizer)


def test_trimming_is_refused_when_padding_changes_the_output(ernie_model):
    model = ernie_model

    def mean_over_all_positions(tokens):          # pools padding too: trimming changes it
        return tokens.float().mean(dim=1, keepdim=True)

    def fixed_length_only(tokens):                # like open_clip's CLIP: needs the full context
        if tokens.shape[1] != model.tokenizer.context_length:
            raise RuntimeError("size mismatch")
        return tokens.float()[:, :1]

    assert not trimming_is_exact(mean_over_all_positions, model.tokenizer)
    assert not trimming_is_exact(fixed_length_only, model.tokenizer)
    assert not trimming_is_exact(lambda t: t.float(), lambda texts: [[1, 2]] * len(texts))


def test_server_batches_are_exact(ernie_model, tmp_path):
    """A burst of concurrent /embed/text and /search requests, batched and trimmed, gives the same
    embeddings and hits as one full-context forward per text and one index search per query."""
    model = ernie_model
    full = encode_text_batch(model, model.tokenizer(TEXTS)).numpy()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, full.shape[1])).astype(np.float32)
    x[:4] = full + 0.05 * rng.standard_normal(full.shape).astype(np.float32)  # near-duplicates of the queries
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = Index.build(x, kind="flat", metadata=[{"path": f"{i}.jpg"} for i in range(len(x))])
    want_ids, want_scores = index.search(full, 5)
    config = ServerConfig(batching=BatchingConfig(max_batch_size=8, max_wait_ms=50))
    app = create_app(model, model.preprocess, model.tokenizer, "test", index, config)
    with ServerThread(app) as url:
        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
                embeds = [ac.post("/embed/text", json={"text": t}) for t in TEXTS]
                searches = [ac.post("/search", json={"text": t, "k": 2 + i}) for i, t in enumerate(TEXTS)]
                return await asyncio.gather(*embeds, *searches)

        with worker_held_until_submitted(app.state.service, {"text": 4, "search_text": 4}):
            replies = asyncio.run(burst())
        health = httpx.get(url + "/health").json()
    assert all(r.status_code == 200 for r in replies)
    got = np.array([r.json()["embeddings"][0] for r in replies[:4]])
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-5)
    for i, r in enumerate(replies[4:]):
        hits = r.json()["hits"]
        assert [h["id"] for h in hits] == want_ids[i, : 2 + i].tolist()
        assert [h["rank"] for h in hits] == list(range(2 + i))
        assert hits[0]["metadata"] == {"path": f"{want_ids[i, 0]}.jpg"} and set(hits[0]) == {"id", "score", "rank", "metadata"}
        np.testing.assert_allclose([h["score"] for h in hits], want_scores[i, : 2 + i], atol=1e-5)
    assert health["trim_text"] is True
    stats = health["stats"]
    assert stats["text"]["items"] == 4 and stats["search_text"]["items"] == 4
    assert stats["text"]["max_batch"] > 1 and stats["search_text"]["max_batch"] > 1   # they shared forwards
    assert stats["search_text"]["busy_s"] > 0
