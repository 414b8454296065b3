"""``ernie-vl env``: machine facts and the kernel choices the toolkit makes here, as text and JSON."""
from __future__ import annotations

import json

import torch

from ernie_vl import runtime
from ernie_vl.app.cli import main
from ernie_vl.moe.kernels.choose import choose_backend


def test_env_json_names_the_machine_and_every_choice(capsys):
    assert main(["env", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    m, c = env["machine"], env["choices"]
    assert m["cpu_model"] == runtime.cpu_info().model and m["cpu_vendor"] == runtime.cpu_info().vendor
    for flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"):
        assert m["isa"][flag] is runtime.has_isa(flag)
    assert m["torch_blas"] == runtime.torch_blas() and m["threads"]["torch_intra_op"] == torch.get_num_threads()
    # the MoE choice is the one a call makes: asked of the same rule, it agrees
    expected = choose_backend("auto", torch.empty(4096, 512), [1024] * 8).name
    assert c["moe"][f"{torch.get_num_threads()}_threads"]["backend"] == expected
    assert c["moe"]["1_threads"]["backend"] in ("loop", "openblas")
    assert set(c["int8"]) >= {"available", "policy", "activation_bits"} or "error" in c["int8"]
    assert "error" in c["int8"] or c["int8"]["activation_bits"] in (7, 8)
    for name in ("long_gop", "short_gop"):
        assert c["video_decode"][name]["threads"] >= 1 and c["video_decode"][name]["reason"]
    assert c["video_decode"]["short_gop"]["threads"] == 1  # short runs never pay for decoder threads
    assert c["search"]["auto_kind_below_threshold"] == "flat" and c["search"]["auto_kind_from_threshold"] == "hnsw"
    from retrieval.backends import FlatStore, IndexParams

    # the exact search's first stage is the one a flat index makes here
    assert c["search"]["flat_first_stage"] == FlatStore(8, IndexParams()).first_stage.name
    assert c["search"]["flat_first_stage_reason"]
    assert torch.get_num_threads() == m["threads"]["torch_intra_op"]  # asking changed nothing


def test_env_text_is_readable(capsys):
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("cpu:") and runtime.cpu_info().model in text
    assert "MoE experts, 1 thread:" in text and "int8 engine" in text and "video decode threads" in text
    assert "int8 activation grid of newly quantized layers: " in text or "int8 engine: unavailable" in text
    assert "search index kind auto: flat below" in text and "exact (flat) search first stage: " in text


def test_env_names_the_moe_kernel_of_each_layer_of_float_and_int8_checkpoints(capsys, tmp_path):
    import ernie_vl
    from ernie_vl.moe.layer import MoEFeedForward
    from ernie_vl.quantize import Int8MoEFeedForward, int8_kernel

    torch.manual_seed(0)
    model = ernie_vl.create_model("test").eval()
    model.save_pretrained(str(tmp_path / "fp32"))
    ernie_vl.quantize_int8(model).save_pretrained(str(tmp_path / "int8"))
    names = [n for n, m in model.named_modules() if isinstance(m, MoEFeedForward)]
    assert names
    assert main(["env", "--json", "--model", str(tmp_path / "fp32")]) == 0
    fp32 = json.loads(capsys.readouterr().out)["model"]["moe_layers"]
    assert sorted(fp32) == sorted(names)
    for v in fp32.values():
        assert v["type"] == "MoEFeedForward" and v["backend"] == "auto"
        assert v["runs"] in ("reference", "loop", "threads", "openblas")
    assert main(["env", "--json", "--model", str(tmp_path / "int8")]) == 0
    int8 = json.loads(capsys.readouterr().out)["model"]["moe_layers"]
    assert sorted(int8) == sorted(names)
    for v in int8.values():
        assert v["type"] == Int8MoEFeedForward.__name__ and v["backend"] == "int8"
        assert v["runs"] == f"int8:{int8_kernel(None)}"
    assert main(["env", "--model", str(tmp_path / "int8")]) == 0
    text = capsys.readouterr().out
    assert f"{names[0]}: Int8MoEFeedForward, int8 -> int8:" in text
