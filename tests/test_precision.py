"""ernie_vl.precision: bf16 autocast and int8 embeddings stay close to fp32; --precision reaches the CLI."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

import ernie_vl
from ernie_vl.precision import PRECISIONS, AutocastModel, at_precision, bf16_native, check_precision


@pytest.fixture(scope="module")
def model() -> ernie_vl.ErnieVL:
    torch.manual_seed(0)
    return ernie_vl.create_model("test").eval()


def _inputs(model):
    torch.manual_seed(1)
    size, vsize = model.cfg.image_encoder.image_size[0], model.cfg.video_encoder.image_size[0]
    images = torch.randn(3, 3, size, size)
    clips = torch.randn(2, 2, 3, vsize, vsize)
    tokens = model.tokenizer(["a red circle", "a blue square on the left", "two green crosses"])
    return {"encode_image": images, "encode_text": tokens, "encode_video": clips}


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_embeddings_at_precision_match_fp32(model, precision):
    prepared = at_precision(model, precision)
    assert prepared is not model
    with torch.inference_mode():
        for method, x in _inputs(model).items():
            ref = getattr(model, method)(x)
            out = getattr(prepared, method)(x)
            assert out.dtype == torch.float32 and out.shape == ref.shape, method
            cos = F.cosine_similarity(out, ref, dim=-1)
            assert cos.min().item() >= 0.99, (method, cos)
            if precision == "bf16":  # bf16 really ran: not bit-identical to fp32
                assert not torch.equal(out, ref), method


def test_bf16_wrapper_delegates_and_fp32_is_unchanged(model):
    assert at_precision(model, "fp32") is model
    wrapped = at_precision(model, "bf16")
    assert isinstance(wrapped, AutocastModel) and wrapped.dtype == torch.bfloat16
    assert torch.equal(wrapped.tokenizer(["a red circle"]), model.tokenizer(["a red circle"]))
    assert wrapped.preprocess is not None and wrapped.eval() is wrapped
    # the weights are cast once (a bf16 copy); the caller's model stays float32
    assert next(wrapped.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32
    assert isinstance(bf16_native(), bool)


def test_int8_model_is_not_requantized_and_refuses_float_precisions(model):
    int8 = at_precision(model, "int8")
    assert at_precision(int8, "int8") is int8
    with pytest.raises(ValueError, match="this model is int8"):
        at_precision(int8, "bf16")


def test_bad_precision_is_named():
    assert PRECISIONS == ("fp32", "bf16", "int8")
    with pytest.raises(ValueError, match=r"unknown precision 'fp16'; valid: fp32, bf16, int8"):
        check_precision("fp16")
    with pytest.raises(TypeError, match="expected an nn.Module"):
        at_precision(object(), "bf16")


def test_open_clip_models_go_int8_through_dynamic_quantization():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4.0,
                               output_dim=24).eval()

    class Tower(torch.nn.Module):  # the encode_image surface of an open_clip model
        def __init__(self):
            super().__init__()
            self.visual = visual

        def encode_image(self, x):
            return self.visual(x)

    tower = Tower().eval()
    int8 = at_precision(tower, "int8")
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        cos = F.cosine_similarity(int8.encode_image(x), tower.encode_image(x), dim=-1)
    assert cos.min().item() >= 0.99
    quantized = [m for m in int8.modules() if "Quantized" in type(m).__name__ or "quantized" in type(m).__module__]
    assert quantized, "no layer was quantized"
    assert open_clip is not None


def test_index_and_serve_take_precision(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from _retrieval_helpers import write_color_image

    from ernie_vl.app.cli import main

    torch.manual_seed(0)
    ckpt = tmp_path / "model"
    ernie_vl.create_model("test").save_pretrained(str(ckpt))
    photos = tmp_path / "photos"
    for i, rgb in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        write_color_image(photos / f"img{i}.png", rgb, size=(20, 16))
    out = {}
    for precision in ("fp32", "bf16"):
        out[precision] = tmp_path / f"index-{precision}"
        assert main(["index", str(ckpt), str(photos), "--out", str(out[precision]), "--workers", "0",
                     "--no-progress", "--json", "--precision", precision]) == 0
        assert json.loads(capsys.readouterr().out)["precision"] == precision
    from retrieval.index import Index

    a, b = Index.load(out["fp32"]), Index.load(out["bf16"])
    assert a.info["precision"] == "fp32" and b.info["precision"] == "bf16"
    def by_path(index):
        ids = sorted(index.ids, key=lambda i: index.metadata(int(i))["path"])
        return torch.as_tensor(index.vectors([int(i) for i in ids]))

    va, vb = by_path(a), by_path(b)
    assert va.shape == vb.shape == (3, va.shape[1])
    cos = (va * vb).sum(-1)
    assert cos.min().item() >= 0.99 and not torch.equal(va, vb)
    with pytest.raises(SystemExit):
        main(["index", str(ckpt), str(photos), "--out", str(tmp_path / "x"), "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err

    # serve: the flag reaches load_model (the server itself is tested in test_server.py)
    import ernie_vl.app.hub as hub
    import ernie_vl.app.serve as serve

    seen = {}
    real_load = hub.load_model

    def load_model(spec, device="cpu", precision="fp32"):
        seen["precision"] = precision
        return real_load(spec, device=device, precision=precision)

    monkeypatch.setattr(hub, "load_model", load_model)
    monkeypatch.setattr(serve, "run_server", lambda app, **kw: seen.setdefault("model", app.state.service.model))
    assert main(["serve", str(ckpt), "--precision", "int8", "--port", "8123"]) == 0
    assert seen["precision"] == "int8"
    from ernie_vl.quantize import quantization_scheme

    assert quantization_scheme(seen["model"]) is not None
