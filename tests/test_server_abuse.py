"""The server under abuse: malformed JSON, bodies over the limit (declared and chunked),
half-open and oversized-header connections, the connection cap, decompression bombs, and the
bounded decoder. Live cases run a real server on loopback with both uvicorn parsers."""
from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest
from PIL import Image, ImageFile

from ernie_vl.app.cli import build_parser
from ernie_vl.app.cli.serve import configs_from_args
from ernie_vl.preprocess import ImageTransform
from ernie_vl.app.serve import ConnectionLimits, ServerConfig, ServerThread, create_app
from ernie_vl.app.serve.body import BodyGuard
from ernie_vl.app.serve.decode import BoundedDecoder, ImageRefused, decode_image, default_max_pixels, input_side
from ernie_vl.app.serve.parsing import HTTPError, check_string, int_field, parse_json_object
from ernie_vl.app.serve.probes import (RawConnection, bomb_png, check_malformed_json, declared_too_large,
                                   half_open_flood, health_ok, multipart_image, streamed_upload)
from retrieval.folder import index_folder

from _retrieval_helpers import ColorModel, write_color_image

MB = 1024 * 1024
PARSERS = ["httptools", "h11"]


def _serve(tmp_path, http, config=None, limits=None):
    root = tmp_path / "photos"
    for name, rgb in {"red": (255, 0, 0), "blue": (0, 0, 255)}.items():
        write_color_image(root / f"{name}.png", rgb)
    model = ColorModel()
    index, _ = index_folder(model, root, model_id=model.model_id, progress=False)
    app = create_app(model, model.preprocess, model.tokenizer, model.model_id, index,
                     config or ServerConfig(max_upload_bytes=200_000, max_form_bytes=256 * 1024))
    return app, ServerThread(app, limits=limits or ConnectionLimits(header_timeout_s=1.0, max_connections=64),
                             http=http)


@pytest.fixture(params=PARSERS)
def server(request, tmp_path):
    if request.param == "httptools":
        pytest.importorskip("httptools")
    app, thread = _serve(tmp_path, request.param)
    with thread as url:
        yield url, app


# --- parsing (unit) ---------------------------------------------------------------------------

@pytest.mark.parametrize("body,needle", [
    (b'{"k": Infinity}', "Infinity is not valid JSON"),
    (b'{"k": NaN}', "NaN is not valid JSON"),
    (b'{"k": 1e400}', "does not fit"),
    (b'{"k": ' + b"7" * 5000 + b"}", "out of range"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"t": "\xff"}', "not UTF-8"),
    (b"{oops", "not valid JSON"),
    (b"  ", "empty"),
])
def test_parse_json_refusals(body, needle):
    with pytest.raises(HTTPError) as err:
        parse_json_object(body)
    assert err.value.status == 400 and needle in err.value.message
    assert len(err.value.message) < 120


def test_parse_json_accepts_brackets_inside_strings_and_plain_objects():
    assert parse_json_object(b'{"text": "' + b"[" * 5000 + b'", "k": 2.0}') == {"text": "[" * 5000, "k": 2.0}
    deep = parse_json_object(b'{"x": ' + b"[" * 200 + b"]" * 200 + b"}")["x"]
    for _ in range(199):
        deep = deep[0]
    assert deep == []
    with pytest.raises(HTTPError, match="object") as err:
        parse_json_object(b"[1]")
    assert err.value.status == 422


def test_field_checks():
    with pytest.raises(HTTPError, match="lone surrogate") as err:
        check_string("a\ud800", "text", 100)
    assert err.value.status == 422
    assert check_string("héllo", "text", 100) == "héllo"
    with pytest.raises(HTTPError) as err:
        check_string("x" * 101, "text", 100)
    assert err.value.status == 413
    assert int_field("7", "k", 10, 100) == 7 and int_field(None, "k", 10, 100) == 10 and int_field(3.0, "k", 1, 9) == 3
    for bad in (True, [3], 2.5, "many", 0, 101, float("inf"), "9" * 5000, {"a": 1}):
        with pytest.raises(HTTPError) as err:
            int_field(bad, "k", 10, 100)
        assert err.value.status == 422 and len(err.value.message) < 100


# --- body guard (unit, a fake ASGI exchange) ---------------------------------------------------

def _run_guard(guard_kwargs, chunks, headers=(), app_reads=True, app_raises=None, complete=True):
    """Drive BodyGuard over a fake server that offers ``chunks`` (then stalls unless ``complete``);
    returns (bytes the app got, messages sent, the guard)."""
    got, sent = bytearray(), []
    queue = list(chunks)

    async def receive():
        if not queue:
            await asyncio.sleep(3600)          # a client that stops sending
        body = queue.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(queue) or not complete}

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        if app_reads:
            while True:
                m = await receive()
                if m["type"] == "http.disconnect":
                    raise RuntimeError("client went away")   # what starlette raises (ClientDisconnect)
                got.extend(m["body"])
                if not m["more_body"]:
                    break
        if app_raises == "before":
            raise ValueError("secret internals")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        if app_raises == "after":
            raise ValueError("secret internals")

    guard = BodyGuard(app, **guard_kwargs)
    scope = {"type": "http", "method": "POST", "path": "/x", "headers": list(headers)}
    asyncio.run(asyncio.wait_for(guard(scope, receive, send), 30))
    return bytes(got), sent, guard


def test_body_guard_stops_a_stream_at_the_limit():
    got, sent, guard = _run_guard(dict(json_limit=350, form_limit=10_000), [b"x" * 100] * 10)
    assert len(got) <= 350                                     # nothing past the limit reached the app
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    assert len(sent) == 2 and guard.stats.too_large == 1      # the app's own answer was dropped
    got, sent, _ = _run_guard(dict(json_limit=350, form_limit=10_000), [b"x" * 100] * 10,
                              headers=[(b"content-type", b"multipart/form-data; boundary=a")])
    assert len(got) == 1000 and sent[0]["status"] == 200      # multipart gets its own limit


def test_body_guard_answers_a_declared_length_before_the_app_runs():
    got, sent, _ = _run_guard(dict(json_limit=350, form_limit=10_000), [b"x"],
                              headers=[(b"content-length", b"300000000")])
    assert got == b"" and sent[0]["status"] == 413 and b"300000000" in sent[1]["body"]
    _, sent, _ = _run_guard(dict(json_limit=350, form_limit=10_000), [b"x"], headers=[(b"content-length", b"1e9")])
    assert sent[0]["status"] == 400


def test_body_guard_idle_timeout():
    _, sent, guard = _run_guard(dict(json_limit=10_000, form_limit=10_000, idle_timeout_s=0.05), [b"a", b"b"])
    assert sent[0]["status"] == 200 and guard.stats.timed_out == 0     # a complete body passes
    got, sent, guard = _run_guard(dict(json_limit=10_000, form_limit=10_000, idle_timeout_s=0.05),
                                  [b"a", b"b"], complete=False)      # then the client stops sending
    assert got == b"ab" and sent[0]["status"] == 408 and len(sent) == 2 and guard.stats.timed_out == 1


def test_body_guard_hides_exceptions_and_keeps_answered_connections():
    _, sent, guard = _run_guard(dict(json_limit=10_000, form_limit=10_000), [b"{}"], app_raises="before")
    assert sent[0]["status"] == 500 and sent[1]["body"] == b'{"error": "internal error"}'
    assert guard.stats.internal_errors == 1
    _, sent, guard = _run_guard(dict(json_limit=10_000, form_limit=10_000), [b"{}"], app_raises="after")
    assert [m.get("status") for m in sent] == [200, None] and guard.stats.internal_errors == 1  # not re-raised
    with pytest.raises(ValueError, match="json_limit"):
        BodyGuard(None, json_limit=0, form_limit=1)


# --- live server: malformed JSON, bodies over the limit ------------------------------------------

def test_malformed_json_gets_4xx_and_the_connection_survives(server):
    url, _ = server
    rows = check_malformed_json(url, depth=100_000)
    assert len(rows) == 18
    for row in rows:
        assert row["status"] is not None and 400 <= row["status"] < 500, row
        assert not row["leaks"] and row["next_ok"], row
    by_case = {r["case"]: r for r in rows}
    assert by_case["k Infinity"]["status"] == 400 and "Infinity" in by_case["k Infinity"]["error"]
    assert by_case["lone surrogate in text"]["status"] == 422
    assert "nested too deeply" in by_case["nesting 100000 deep"]["error"]


def test_bodies_over_the_limit_are_refused_while_streaming(server):
    url, app = server
    assert declared_too_large(url, "/search", 300 * MB).status == 413
    assert declared_too_large(url, "/no/such/route", 2 * MB).status == 413   # every route, before routing
    assert declared_too_large(url, "/embed/image", 400 * MB, "multipart/form-data; boundary=x").status == 413
    json_stream = streamed_upload(url, "/search", total=64 * MB, chunk=64 * 1024)
    assert json_stream.status == 413 and json_stream.bytes_sent < 32 * MB, json_stream
    form_stream = streamed_upload(url, "/embed/image", total=64 * MB, chunk=64 * 1024,
                                  content_type="multipart/form-data")
    assert form_stream.status == 413 and form_stream.bytes_sent < 32 * MB, form_stream
    refused = app.state.service.body_stats
    assert refused.too_large == 5
    assert health_ok(url)


# --- live server: connections ------------------------------------------------------------------

def test_half_open_connections_are_closed_and_health_stays_up(server):
    url, app = server
    result = half_open_flood(url, count=300, wait_s=60)     # 300 over a cap of 64, 1 s header deadline
    assert result.opened + result.failed_to_open == 300 and result.opened >= 250
    assert result.health_during and result.health_after
    assert result.closed_by_server == result.opened and result.seconds_until_all_closed is not None
    stats = app.state.connections.to_dict()
    assert stats["shed"] > 0 and stats["header_timeouts"] > 0
    assert stats["shed"] + stats["header_timeouts"] >= result.opened


def test_silent_and_oversized_header_connections_are_closed(server):
    url, _ = server
    silent = RawConnection(url)
    assert silent.is_closed_by_server(wait_s=30)             # never sent a byte: closed at the header deadline
    big = RawConnection(url)
    big.send(b"GET /health HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 40_000)
    response = big.read_response()
    assert response.status in (400, 431)                     # h11's own limit answers 400, ours 431
    assert big.is_closed_by_server(wait_s=30)
    keep = RawConnection(url)                                # a normal client is not affected
    assert keep.request("GET", "/health").status == 200 and keep.request("GET", "/health").status == 200


def test_connection_cap_refuses_only_when_every_connection_is_busy(tmp_path):
    app, thread = _serve(tmp_path, "h11", limits=ConnectionLimits(max_connections=2, header_timeout_s=30))
    with thread as url:
        registry = app.state.connections
        busy = [RawConnection(url) for _ in range(2)]
        for conn in busy:                                    # headers done, body unfinished: busy
            conn.send(b"POST /search HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: 100\r\n\r\n{")
        deadline = time.monotonic() + 30
        while (registry.waiting or len(registry.open) < 2) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(registry.open) == 2 and not registry.waiting
        refused = RawConnection(url)
        assert refused.read_response().status == 503
        assert registry.stats["refused"] == 1
        for conn in busy:
            conn.close()
        deadline = time.monotonic() + 30
        while registry.open and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health_ok(url)


# --- images ------------------------------------------------------------------------------------

def test_bomb_is_refused_from_its_header_without_decoding(monkeypatch):
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or real_load(self))
    png = bomb_png(6000, 6000, mode="1")
    assert len(png) < 100_000
    with pytest.raises(ImageRefused) as err:
        decode_image(png, "bomb.png", max_pixels=4096 * 4096)
    assert err.value.status == 413 and "6000x6000" in err.value.reason and not loads
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)     # PIL's own bomb guard: also a 413
    with pytest.raises(ImageRefused) as err:
        decode_image(bomb_png(100, 100, mode="1"), "b.png", max_pixels=10**9)
    assert err.value.status == 413
    with pytest.raises(ImageRefused) as err:
        decode_image(b"GIF89a not really", "x.gif", max_pixels=10**6)
    assert err.value.status == 415


def test_large_jpeg_decodes_at_a_reduced_scale():
    buf = io.BytesIO()
    Image.new("RGB", (400, 300), (10, 200, 30)).save(buf, format="JPEG")
    small = decode_image(buf.getvalue(), "a.jpg", max_pixels=10_000)
    assert small.size == (100, 75) and small.mode == "RGB"      # 1/4 scale: the first that fits
    assert decode_image(buf.getvalue(), "a.jpg", max_pixels=120_000).size == (400, 300)
    with pytest.raises(ImageRefused):
        decode_image(buf.getvalue(), "a.jpg", max_pixels=1_000)  # even 1/8 (50x37) is over


def test_pixel_cap_follows_the_model_input():
    assert input_side(ImageTransform(224)) == 224
    assert default_max_pixels(ImageTransform(224)) == 256 * 224 * 224
    assert default_max_pixels(ImageTransform(32)) == 2048 * 2048        # floor
    assert default_max_pixels(ImageTransform(448)) == 4096 * 4096       # ceiling
    assert default_max_pixels(object()) == 4096 * 4096                  # unknown input size
    tv = pytest.importorskip("torchvision.transforms")
    assert input_side(tv.Compose([tv.Resize(336), tv.CenterCrop(336), tv.ToTensor()])) == 336


def test_decoder_semaphore_bounds_concurrent_decodes(monkeypatch):
    both_running = threading.Barrier(2, timeout=30)

    def preprocess(image):
        both_running.wait()          # passes only when two decodes run at once
        return image.size

    trims = []
    decoder = BoundedDecoder(preprocess, max_pixels=10_000, workers=2)
    decoder._trim = trims.append
    png = bomb_png(20, 20, mode="L")

    async def burst():
        sizes = await asyncio.gather(*(decoder(png, f"{i}.png") for i in range(8)))
        deadline = time.monotonic() + 30
        while not trims and time.monotonic() < deadline:     # memory handed back after the burst
            await asyncio.sleep(0.05)
        return sizes

    assert asyncio.run(burst()) == [(20, 20)] * 8
    assert decoder.stats.peak_concurrent == 2 and decoder.stats.decoded == 8
    assert trims == [0] and decoder.stats.memory_trims == 1


def test_live_bomb_upload_is_413_and_server_stays_up(server):
    url, app = server
    body, ctype = multipart_image(bomb_png(6000, 6000, mode="1"))
    conn = RawConnection(url)
    r = conn.request("POST", "/embed/image", body, content_type=ctype)
    assert r.status == 413 and "6000x6000" in r.json_error()
    assert conn.request("GET", "/health").status == 200
    assert app.state.service.decoder.stats.refused == 1


def test_cli_flags_reach_the_configs():
    args = build_parser().parse_args(["serve", "m", "--max-body-mb", "2", "--max-upload-mb", "1", "--max-json-kb", "64",
                                      "--max-image-pixels", "1000000", "--timeout-headers", "3",
                                      "--max-connections", "100", "--max-header-kb", "8"])
    config, limits = configs_from_args(args)
    assert (config.max_form_bytes, config.max_json_bytes, config.max_image_pixels) == (2 * MB, 64 * 1024, 10**6)
    assert (limits.header_timeout_s, limits.max_connections, limits.max_header_bytes) == (3, 100, 8192)
    with pytest.raises(ValueError, match="max-json-kb"):
        configs_from_args(build_parser().parse_args(["serve", "m", "--max-json-kb", "0"]))
    with pytest.raises(ValueError, match="header_timeout_s"):
        configs_from_args(build_parser().parse_args(["serve", "m", "--timeout-headers", "-1"]))
