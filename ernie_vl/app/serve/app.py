"""The FastAPI app: ``/health``, ``/embed/text``, ``/embed/image``, ``/search`` with dynamic batching.

Text and image embedding and text and image search each have a :class:`DynamicBatcher`; a search
batch is one tokenisation, one forward and one index scan for all its queries. The batchers share
one worker thread, so one model forward (or index scan) runs at a time. Text batches are cut to
their longest real sequence when that is exact for the model (checked at start-up, see
``text_trim``). What a client sends is bounded before it costs memory: request bodies by
:class:`~ernie_vl.app.serve.body.BodyGuard`, images by :class:`~ernie_vl.app.serve.decode.BoundedDecoder`;
bad requests get a 4xx with a short message (``parsing``), and nothing a client sends can stop the
server or close another request's connection.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from ernie_vl.app.serve.batcher import BatchingConfig, DynamicBatcher, QueueFullError
from ernie_vl.app.serve.body import BodyGuard, BodyStats
from ernie_vl.app.serve.decode import BoundedDecoder, ImageRefused, default_max_pixels, usable_cores
from ernie_vl.app.serve.parsing import HTTPError, check_string, int_field, parse_json_object
from ernie_vl.app.serve.text_trim import pad_id_of, trim_padding, trimming_is_exact
from retrieval.embed import encode_image_batch, encode_text_batch
from retrieval.index import Index

MB = 1024 * 1024


class ErrorResponse(JSONResponse):
    """``{"error": message}`` as ASCII JSON: encodable whatever the message echoes back."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content).encode("ascii")


@dataclass
class ServerConfig:
    """Limits and batching of the HTTP server (connection limits: ``connections.ConnectionLimits``).

    ``max_image_pixels`` None: from the model's input size (``decode.default_max_pixels``);
    ``decode_workers`` None: the usable cores.
    """

    batching: BatchingConfig = field(default_factory=BatchingConfig)
    max_upload_bytes: int = 10 * MB          # one image file
    max_form_bytes: int = 32 * MB            # a whole multipart body
    max_json_bytes: int = 1 * MB             # any other body
    body_timeout_s: float = 30.0             # longest gap between two pieces of a body
    max_image_pixels: Optional[int] = None
    decode_workers: Optional[int] = None
    max_texts_per_request: int = 64
    max_images_per_request: int = 16
    max_text_chars: int = 2000
    max_k: int = 1000
    default_k: int = 10
    trim_text: Optional[bool] = None  # cut text batches to their longest sequence; None = when exact

    def __post_init__(self) -> None:
        if self.trim_text not in (None, True, False):
            raise ValueError(f"trim_text must be None (auto), True or False, got {self.trim_text!r}")
        for name in ("max_upload_bytes", "max_form_bytes", "max_json_bytes", "max_texts_per_request",
                     "max_images_per_request", "max_text_chars", "max_k", "default_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_image_pixels", "decode_workers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None (automatic) or a positive integer, got {value!r}")
        if isinstance(self.body_timeout_s, bool) or not isinstance(self.body_timeout_s, (int, float)) \
                or not self.body_timeout_s > 0:
            raise ValueError(f"body_timeout_s must be > 0, got {self.body_timeout_s!r}")
        if self.max_form_bytes < self.max_upload_bytes:
            raise ValueError(f"max_form_bytes ({self.max_form_bytes}) must be >= max_upload_bytes "
                             f"({self.max_upload_bytes}): one image must fit in a request")


class Service:
    """The model, tokenizer, preprocess and optional index behind the endpoints."""

    def __init__(self, model: Any, preprocess: Callable, tokenizer: Callable, model_id: str,
                 index: Optional[Index], config: ServerConfig) -> None:
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.model_id, self.index, self.config = model_id, index, config
        if hasattr(model, "eval"):
            model.eval()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ernie-vl-model")
        b = config.batching
        self.text_batcher = DynamicBatcher(self._embed_texts, b, self.executor, "text")
        self.image_batcher = DynamicBatcher(self._embed_images, b, self.executor, "image")
        self.search_text_batcher = DynamicBatcher(self._search_texts, b, self.executor, "search_text")
        self.search_image_batcher = DynamicBatcher(self._search_images, b, self.executor, "search_image")
        self.batchers = (self.text_batcher, self.image_batcher, self.search_text_batcher, self.search_image_batcher)
        self.embedding_dim: Optional[int] = index.dim if index is not None else None
        self.decoder = BoundedDecoder(preprocess, config.max_image_pixels or default_max_pixels(preprocess),
                                      config.decode_workers or usable_cores())
        self.body_stats = BodyStats()
        self.pad_id = pad_id_of(tokenizer)
        self.trim_text = config.trim_text
        if self.trim_text is None:
            self.trim_text = trimming_is_exact(lambda t: encode_text_batch(self.model, t), tokenizer)

    # batch functions (worker thread)
    def _text_embeddings(self, texts: list[str]) -> np.ndarray:
        """(B,) texts -> (B, D) float32: one tokenisation and one forward for the batch."""
        tokens = self.tokenizer(texts)
        if self.trim_text:
            tokens = trim_padding(tokens, self.pad_id)
        return encode_text_batch(self.model, tokens).numpy()

    def _embed_texts(self, texts: list[str]) -> list[np.ndarray]:
        return list(self._text_embeddings(texts))

    def _embed_images(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        return list(encode_image_batch(self.model, torch.stack(images)).numpy())

    def _search_rows(self, queries: np.ndarray, ks: list[int]) -> list[list[dict]]:
        """(Q, D) queries, one k each -> hits per query: one index search for the whole batch."""
        if queries.shape[1] != self.index.dim:
            raise HTTPError(409, f"the model makes {queries.shape[1]}-d embeddings, the index holds {self.index.dim}-d")
        ids, scores = self.index.search(np.ascontiguousarray(queries, np.float32), max(ks))
        # SearchHit.to_dict's fields, without its deep copy: the rows only go to the JSON encoder
        meta = self.index.metadata
        return [[{"id": int(i), "score": float(sc), "rank": r, "metadata": meta(int(i))}
                 for r, (i, sc) in enumerate(zip(row_ids[:k], row_scores[:k])) if i >= 0]
                for row_ids, row_scores, k in zip(ids.tolist(), scores.tolist(), ks)]

    def _search_texts(self, items: list[tuple[str, int]]) -> list[list[dict]]:
        return self._search_rows(self._text_embeddings([t for t, _ in items]), [k for _, k in items])

    def _search_images(self, items: list[tuple[torch.Tensor, int]]) -> list[list[dict]]:
        queries = encode_image_batch(self.model, torch.stack([x for x, _ in items])).numpy()
        return self._search_rows(queries, [k for _, k in items])

    async def start(self) -> None:
        for b in self.batchers:
            await b.start()

    async def stop(self) -> None:
        for b in self.batchers:
            await b.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # request parsing
    def check_texts(self, texts: Any) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts:
            raise HTTPError(422, "give 'text' (a string) or 'texts' (a non-empty list of strings)")
        if len(texts) > self.config.max_texts_per_request:
            raise HTTPError(413, f"{len(texts)} texts in one request; the limit is {self.config.max_texts_per_request}")
        return [check_string(t, "text", self.config.max_text_chars) for t in texts]

    async def read_upload(self, upload: Any) -> torch.Tensor:
        if not isinstance(upload, UploadFile):
            raise HTTPError(422, "image fields must be file uploads (multipart/form-data)")
        name = upload.filename or "<upload>"
        data = await upload.read(self.config.max_upload_bytes + 1)
        if len(data) > self.config.max_upload_bytes:
            raise HTTPError(413, f"upload {name!r} is larger than {self.config.max_upload_bytes} bytes")
        try:
            return await self.decoder(data, name)
        except ImageRefused as err:
            raise HTTPError(err.status, f"image {name!r} refused: {err.reason}") from None

    async def json_body(self, request: Request) -> dict:
        return parse_json_object(await request.body())

    async def form(self, request: Request):
        try:
            return await request.form(max_files=self.config.max_images_per_request, max_fields=16,
                                      max_part_size=self.config.max_upload_bytes)
        except MultiPartException as err:   # starlette's messages are written for clients
            raise HTTPError(400, f"malformed multipart form: {err.message}") from None
        except (ValueError, UnicodeError, KeyError):
            raise HTTPError(400, "malformed multipart form") from None


def create_app(model: Any, preprocess: Callable, tokenizer: Callable, model_id: str,
               index: Optional[Index] = None, config: Optional[ServerConfig] = None) -> FastAPI:
    """Build the app; batchers start and stop with the app's lifespan."""
    service = Service(model, preprocess, tokenizer, model_id, index, config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="ERNIE-VL search", lifespan=lifespan)
    app.state.service = service
    cfg = service.config
    app.add_middleware(BodyGuard, json_limit=cfg.max_json_bytes, form_limit=cfg.max_form_bytes,
                       idle_timeout_s=cfg.body_timeout_s, stats=service.body_stats)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, err: HTTPError):
        return ErrorResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(QueueFullError)
    async def _busy(request: Request, err: QueueFullError):
        return ErrorResponse({"error": str(err)}, status_code=503)

    @app.get("/health")
    async def health(request: Request) -> dict:
        s = service
        connections = getattr(request.app.state, "connections", None)
        return {"status": "ok", "model_id": s.model_id,
                "index": None if s.index is None else {"count": len(s.index), "kind": s.index.kind,
                                                       "embedding_dim": s.index.dim},
                "batching": asdict(s.config.batching), "trim_text": s.trim_text,
                "stats": {b.name: b.stats.to_dict() for b in s.batchers},
                "limits": {"max_json_bytes": s.config.max_json_bytes, "max_form_bytes": s.config.max_form_bytes,
                           "max_upload_bytes": s.config.max_upload_bytes},
                "refused": s.body_stats.to_dict(), "decode": s.decoder.to_dict(),
                "connections": None if connections is None else connections.to_dict()}

    @app.post("/embed/text")
    async def embed_text(request: Request) -> JSONResponse:
        body = await service.json_body(request)
        texts = service.check_texts(body.get("texts", body.get("text")))
        emb = await service.text_batcher.submit_many(texts)
        return JSONResponse({"model_id": service.model_id, "dim": int(emb[0].shape[0]),
                             "embeddings": [e.tolist() for e in emb]})

    @app.post("/embed/image")
    async def embed_image(request: Request) -> JSONResponse:
        form = await service.form(request)
        uploads = [v for key in ("file", "files", "image") for v in form.getlist(key)]
        if not uploads:
            raise HTTPError(422, "upload one or more images in the multipart field 'file'")
        if len(uploads) > service.config.max_images_per_request:
            raise HTTPError(413, f"{len(uploads)} images; the limit is {service.config.max_images_per_request}")
        tensors = [await service.read_upload(u) for u in uploads]
        emb = await service.image_batcher.submit_many(tensors)
        return JSONResponse({"model_id": service.model_id, "dim": int(emb[0].shape[0]),
                             "embeddings": [e.tolist() for e in emb]})

    @app.post("/search")
    async def search(request: Request) -> JSONResponse:
        if service.index is None:
            raise HTTPError(409, "the server was started without an index (--index)")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await service.form(request)
            upload = form.get("image") or form.get("file")
            if upload is None:
                raise HTTPError(422, "multipart search needs an image in the field 'image'")
            k = int_field(form.get("k"), "k", service.config.default_k, service.config.max_k)
            hits = await service.search_image_batcher.submit((await service.read_upload(upload), k))
            name = getattr(upload, "filename", None)
            kind, shown = "image", None if name is None else name.encode("utf-8", "replace").decode("utf-8")
        else:
            body = await service.json_body(request)
            text = body.get("text", body.get("query"))
            if not isinstance(text, str):
                raise HTTPError(422, "JSON search needs 'text': a string (or send an image as multipart 'image')")
            text = check_string(text, "text", service.config.max_text_chars)
            k = int_field(body.get("k"), "k", service.config.default_k, service.config.max_k)
            hits = await service.search_text_batcher.submit((text, k))
            kind, shown = "text", text
        return JSONResponse({"query": {"kind": kind, "value": shown}, "k": k, "hits": hits})

    return app
