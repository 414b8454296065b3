"""Few-shot video training: image -> video inflation, the recipe, EMA, freezing, drop-path."""
from __future__ import annotations

import json

import pytest
import torch

import ernie_vl
from encoders.convert import video_encoder_from_image_encoder
from encoders.vit import ImageEncoder, ImageEncoderConfig
from ernie_vl.inflate import inflate_video_from_image
from ernie_vl.train.ema import ModelEMA
from ernie_vl.train.finetune import add_drop_path, freeze
from ernie_vl.train.recipe import PLAIN, choose_recipe

SMALL = dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_ratio=2.0)


# --------------------------------------------------------------------------- inflation


def test_inflated_tubelet_encoder_is_the_frame_mean_of_the_image_encoder_on_tubelet_means():
    """Mean inflation (I3D): the clip encoder = the image encoder on each tubelet's mean frame, averaged."""
    torch.manual_seed(0)
    image = ImageEncoder(ImageEncoderConfig(**SMALL)).eval()
    video = video_encoder_from_image_encoder(image, 8, "divided", "per_frame", tubelet_size=4).eval()
    clips = torch.randn(3, 8, 3, 32, 32)  # moving content: every frame different
    with torch.no_grad():
        got = video(clips).pooled
        means = clips.reshape(3, 2, 4, 3, 32, 32).mean(2)  # (B, T', 3, H, W)
        want = torch.stack([image(means[:, t]).pooled for t in range(2)], 1).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_inflated_model_embeds_a_still_clip_as_its_image_and_keeps_the_rest():
    torch.manual_seed(0)
    # tiny's video encoder without its conv tokenizer (tiny's image encoder has none to inflate it from)
    model = ernie_vl.create_model("tiny", class_names=["a", "b", "c"], video_encoder={"conv_stem": 0}).eval()
    assert model.cfg.video_encoder.patch_size != model.cfg.image_encoder.patch_size  # tiny: 8 vs 4
    new = inflate_video_from_image(model).eval()
    assert new.cfg.video_encoder.patch_size == model.cfg.image_encoder.patch_size
    assert new.cfg.video_encoder.tubelet_size == 4 and new.cfg.video_encoder.num_frames == 8
    assert new.cfg.video_encoder.cls_mode == "per_frame"
    frames = torch.randn(2, 3, 32, 32)
    tokens = model.tokenizer(["a red square", "a blue disc"])
    with torch.no_grad():
        still = frames[:, None].expand(2, 8, 3, 32, 32).contiguous()
        torch.testing.assert_close(new.encode_video(still), new.encode_image(frames), rtol=1e-4, atol=1e-5)
        # the image and text paths and the head are untouched
        torch.testing.assert_close(new.encode_image(frames), model.encode_image(frames))
        torch.testing.assert_close(new.encode_text(tokens), model.encode_text(tokens))
    assert torch.equal(new.classifier.weight, model.classifier.weight) and new.class_names == ["a", "b", "c"]
    assert torch.count_nonzero(new.video_encoder.time_embed) == 0
    for block in new.video_encoder.blocks:
        assert torch.count_nonzero(block.temporal_proj.weight) == 0


# --------------------------------------------------------------------------- the recipe


def test_recipe_by_clips_per_class():
    few = choose_recipe(40)
    assert (few.temporal_jitter, few.speed_min, few.label_smoothing, few.weight_decay, few.drop_path, few.epochs,
            few.freeze) == (True, 0.8, 0.2, 0.1, 0.1, 400.0, "none")
    assert few.ema > 0 and set(few.why) >= {"temporal_jitter", "ema", "freeze", "epochs"}
    many = choose_recipe(512)
    assert (many.temporal_jitter, many.speed_min, many.label_smoothing, many.weight_decay, many.drop_path,
            many.epochs, many.ema) == (True, 1.0, 0.1, 0.05, 0.0, None, 0.0)
    assert choose_recipe(5000).temporal_jitter is False
    assert choose_recipe(4, pretrained=True).freeze == "backbone"
    assert choose_recipe(4, pretrained=False).freeze == "none"
    assert choose_recipe(40, expected_steps=100).ema == 0.0  # too short to average
    off = choose_recipe(40, mode="off").to_dict()
    assert {k: off[k] for k in PLAIN} == PLAIN
    with pytest.raises(ValueError, match="unknown recipe"):
        choose_recipe(40, mode="fast")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from _train_helpers import make_tiny_data

    return make_tiny_data(tmp_path_factory.mktemp("fsdata"))


def test_trainer_logs_the_recipe_and_user_values_win(tiny_data, tmp_path):
    from _train_helpers import read_log, tiny_config

    from ernie_vl.train import train

    train(tiny_config(tiny_data, tmp_path / "r", max_steps=2, weight_decay=0.01, epochs=2.0, pairs=[], recipe="auto"))
    setup = json.loads((tmp_path / "r" / "setup.json").read_text())
    recipe = setup["recipe"]
    assert setup["videos"] == {"clips_per_class": 3.0, "clips": 12, "classes": 4}
    assert recipe["settings"]["weight_decay"] == 0.01 and recipe["settings"]["epochs"] == 2.0
    assert recipe["given"] == ["epochs", "weight_decay"]
    assert recipe["settings"]["label_smoothing"] == 0.2 and recipe["settings"]["temporal_jitter"] is True
    assert recipe["max_steps"] == 2  # min(max_steps, ceil(2 epochs x 12 clips / 4 per step) = 6)
    assert read_log(tmp_path / "r")[0]["setup"]["recipe"] == recipe
    # an epoch cap binds when it is the smaller
    train(tiny_config(tiny_data, tmp_path / "cap", max_steps=50, epochs=1.0, pairs=[]))
    assert len(read_log(tmp_path / "cap")) == 3  # 1 epoch = 12 clips / 4 per step


def test_recipe_off_is_the_plain_behaviour(tiny_data, tmp_path):
    from _train_helpers import tiny_config

    from ernie_vl.train.trainer import Trainer

    trainer = Trainer(tiny_config(tiny_data, tmp_path / "off", max_steps=1, recipe="off"))
    assert trainer.settings == PLAIN and trainer.ema is None
    assert trainer.videos.clips.shape[1] == 4  # no extra frames cached: no jitter
    assert trainer.model.cfg.loss.label_smoothing == 0.1  # the preset's


# --------------------------------------------------------------------------- transfer in the trainer


def test_a_pairs_trained_checkpoint_starts_its_video_path_from_the_image_path(tiny_data, tmp_path):
    from _train_helpers import tiny_config

    from ernie_vl.train import train
    from ernie_vl.train.finetune import trained_on
    from ernie_vl.train.trainer import Trainer

    pre = train(tiny_config(tiny_data, tmp_path / "pre", max_steps=2, videos=[]))
    assert trained_on(pre.final_dir) == {"pairs"}
    trainer = Trainer(tiny_config(tiny_data, tmp_path / "ft", model=str(pre.final_dir), max_steps=1))
    model = trainer.model
    assert trainer.video_init == "inflated from the image encoder"
    assert model.class_names == ["grow", "move_left", "move_right", "shrink"] and model.classifier.out_features == 4
    for name, p in model.image_encoder.blocks.named_parameters():
        torch.testing.assert_close(dict(model.video_encoder.blocks.named_parameters())[name], p)
    assert json.loads((tmp_path / "ft" / "setup.json").read_text())["video_init"] == trainer.video_init
    result = trainer.run()
    assert trained_on(result.final_dir) == {"pairs", "videos"}
    # a checkpoint that has seen videos keeps its video encoder; "keep" keeps it too
    again = Trainer(tiny_config(tiny_data, tmp_path / "ft2", model=str(result.final_dir), max_steps=1))
    assert again.video_init == "kept from the checkpoint"
    kept = Trainer(tiny_config(tiny_data, tmp_path / "ft3", model=str(pre.final_dir), max_steps=1, video_init="keep"))
    assert kept.video_init == "kept from the checkpoint"


def test_video_start_rules():
    from ernie_vl.train.finetune import INFLATED, KEPT, KEPT_STEM, video_start

    pairs = {"pairs"}
    assert video_start("auto", True, pairs, video_stem=False) == INFLATED
    assert video_start("auto", True, pairs, video_stem=True) == KEPT_STEM  # even where an image stem could inflate it
    assert video_start("auto", True, {"pairs", "videos"}, video_stem=False) == KEPT  # has seen videos
    assert video_start("auto", True, {"open_clip"}, video_stem=False) == KEPT  # already inflated
    assert video_start("auto", False, pairs, video_stem=False) == KEPT  # no videos to fine-tune on
    assert video_start("keep", True, pairs, video_stem=False) == KEPT
    assert video_start("image", True, {"pairs", "videos"}, video_stem=True) == INFLATED  # or inflation refuses


def test_image_init_inflates_a_video_stem_from_the_image_encoders_stem_and_auto_keeps_it(tiny_data, tmp_path):
    """With a conv tokenizer in the image encoder too, ``--video-init image`` inflates the video path through
    it; ``auto`` keeps the checkpoint's own video stem and says why."""
    from _train_helpers import tiny_config

    from ernie_vl.train import train
    from ernie_vl.train.trainer import Trainer

    stems = {"image_encoder": {"conv_stem": [4, 8]}, "video_encoder": {"conv_stem": {"channels": [4], "frame_diff": True}}}
    pre = train(tiny_config(tiny_data, tmp_path / "pre", max_steps=1, videos=[], model_overrides=stems))
    auto = Trainer(tiny_config(tiny_data, tmp_path / "auto", model=str(pre.final_dir), max_steps=1))
    assert auto.video_init.startswith("kept: the video encoder has a conv stem")
    assert auto.model.video_encoder.cfg.conv_stem.channels == (4,)
    trainer = Trainer(tiny_config(tiny_data, tmp_path / "ft", model=str(pre.final_dir), max_steps=1, video_init="image"))
    assert trainer.video_init == "inflated from the image encoder"
    video, image = trainer.model.video_encoder, trainer.model.image_encoder
    assert video.cfg.conv_stem.channels == (4, 8) and video.cfg.conv_stem.frame_diff  # image's blocks, video's diffs
    torch.testing.assert_close(video.stem[3].weight[:, :, 1], image.stem[3].weight, rtol=0, atol=0)
    torch.testing.assert_close(video.stem[4].running_var, image.stem[4].running_var, rtol=0, atol=0)


def test_auto_keeps_the_video_path_of_a_pairs_trained_checkpoint_with_a_stem_and_says_why(tiny_data, tmp_path):
    """A video encoder with a conv tokenizer and an image encoder without one: ``auto`` keeps it (and says
    why), ``image`` refuses."""
    from _train_helpers import read_log, tiny_config

    from ernie_vl.train import train
    from ernie_vl.train.trainer import Trainer

    stem = {"video_encoder": {"conv_stem": {"channels": [4, 8], "frame_diff": True}}}
    pre = train(tiny_config(tiny_data, tmp_path / "pre", max_steps=1, videos=[], model_overrides=stem))
    trainer = Trainer(tiny_config(tiny_data, tmp_path / "ft", model=str(pre.final_dir), max_steps=1))
    why = ("kept: the video encoder has a conv stem, which auto does not inflate (--video-init image inflates it "
           "from an image encoder with its own conv tokenizer)")
    assert trainer.video_init == why
    saved = ernie_vl.ErnieVL.from_pretrained(pre.final_dir)
    for name, p in saved.video_encoder.state_dict().items():  # the checkpoint's video encoder, unchanged
        torch.testing.assert_close(trainer.model.video_encoder.state_dict()[name], p, rtol=0, atol=0)
    assert json.loads((tmp_path / "ft" / "setup.json").read_text())["video_init"] == why
    trainer.run()
    assert read_log(tmp_path / "ft")[0]["setup"]["video_init"] == why
    with pytest.raises(ValueError, match=r"conv_stem=ConvStemConfig\(channels=\(4, 8\), frame_diff=True.*"
                                         r"cannot be inflated.*--video-init keep"):
        Trainer(tiny_config(tiny_data, tmp_path / "img", model=str(pre.final_dir), max_steps=1, video_init="image"))


# --------------------------------------------------------------------------- EMA, freezing, drop-path


def test_ema_tracks_the_average_and_swaps_back():
    net = torch.nn.Linear(3, 2)
    ema = ModelEMA(net, 0.5)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)  # decay min(0.5, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.shadow["weight"], d * start + (1 - d) * (start + 1))
    trained = net.weight.detach().clone()
    with ema.swapped(net):
        torch.testing.assert_close(net.weight, ema.shadow["weight"])
    assert torch.equal(net.weight, trained)
    copy = ModelEMA(torch.nn.Linear(3, 2), 0.9)
    copy.load_state_dict(ema.state_dict())
    assert copy.updates == 1 and torch.equal(copy.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(net, 1.0)


def test_ema_averages_batchnorm_statistics_with_the_weights():
    """A conv tokenizer's BatchNorm: evaluating averaged weights with the live running statistics
    normalises by the wrong mean and variance, so the running statistics are averaged too."""
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 1), torch.nn.BatchNorm1d(3))
    ema = ModelEMA(net, 0.5)
    mean0 = net[1].running_mean.clone()
    net.train()
    net(torch.randn(8, 2, 5) + 4.0)  # moves the running statistics
    live_mean, live_var = net[1].running_mean.clone(), net[1].running_var.clone()
    assert not torch.allclose(live_mean, mean0)
    ema.update(net)
    d = 2 / 11
    torch.testing.assert_close(ema.shadow["1.running_mean"], d * mean0 + (1 - d) * live_mean)
    assert "1.num_batches_tracked" not in ema.shadow  # integer counter: not averaged
    with ema.swapped(net):
        torch.testing.assert_close(net[1].running_mean, d * mean0 + (1 - d) * live_mean)
        torch.testing.assert_close(net[1].running_var, ema.shadow["1.running_var"])
    assert torch.equal(net[1].running_mean, live_mean) and torch.equal(net[1].running_var, live_var)
    # a state saved before buffers were averaged: its parameters load, the buffers restart from the model's
    old = {**ema.state_dict(), "shadow": {k: v for k, v in ema.shadow.items() if "running" not in k}}
    fresh = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 1), torch.nn.BatchNorm1d(3))
    resumed = ModelEMA(fresh, 0.5)  # as a resumed run builds it: on the new model, then loads the states
    fresh.load_state_dict(net.state_dict())
    resumed.load_state_dict(old)
    torch.testing.assert_close(resumed.shadow["0.weight"], ema.shadow["0.weight"])
    with resumed.swapped(fresh):
        assert torch.equal(fresh[1].running_mean, live_mean)  # not the new model's initial statistics
    resumed.update(fresh)
    torch.testing.assert_close(resumed.shadow["1.running_mean"], live_mean)
    with pytest.raises(ValueError, match="lacks 1 parameters"):
        ModelEMA(net, 0.5).load_state_dict({**old, "shadow": {k: v for k, v in old["shadow"].items()
                                                               if k != "0.weight"}})


def test_ema_run_resumes_exactly_and_saves_the_average(tiny_data, tmp_path):
    from safetensors.torch import load_file

    from _train_helpers import tiny_config

    from ernie_vl.train import train

    kw = dict(max_steps=6, ema=0.9)
    full = train(tiny_config(tiny_data, tmp_path / "full", **kw))
    train(tiny_config(tiny_data, tmp_path / "part", **kw), stop_after=3)
    train(tiny_config(tiny_data, tmp_path / "part", resume=True, **kw))
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert json.loads((tmp_path / "full" / "setup.json").read_text())["recipe"]["settings"]["ema"] == 0.9
    del full


def test_freeze_backbone_trains_only_a_prompt_initialised_head(tiny_data, tmp_path):
    from _train_helpers import tiny_config

    from ernie_vl.train.trainer import Trainer

    trainer = Trainer(tiny_config(tiny_data, tmp_path / "probe", max_steps=3, freeze="backbone", pairs=[]))
    model = trainer.model
    assert trainer.trainable == model.classifier.weight.numel() + model.classifier.bias.numel()
    from encoders.prompts import ensemble_token_embeddings

    text = ensemble_token_embeddings(model.encode_text, trainer.videos.prompt_tokens)
    cos = torch.nn.functional.cosine_similarity(model.classifier.weight.detach(), text, dim=-1)
    torch.testing.assert_close(cos, torch.ones(4))  # the head starts as the zero-shot classifier
    setup = json.loads((tmp_path / "probe" / "setup.json").read_text())
    assert setup["head_init"].startswith("from the class prompts")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.run()
    after = model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["classifier.bias", "classifier.weight"]
    with pytest.raises(ValueError, match="unknown freeze"):
        freeze(model, "encoders")


def test_freeze_backbone_with_an_encoder_reading_head_says_its_classifier_starts_random(tiny_data, tmp_path):
    """Text embeddings are not in the encoder's feature space: the probe's classifier keeps its random
    start, and setup.json and the first log record say so."""
    from _train_helpers import read_log, tiny_config

    from ernie_vl.train.trainer import Trainer

    over = {"head": {"video_cls_input": "encoder"}}
    torch.manual_seed(0)
    fresh = ernie_vl.create_model("test", class_names=["grow", "move_left", "move_right", "shrink"], **over)
    trainer = Trainer(tiny_config(tiny_data, tmp_path / "probe", max_steps=1, freeze="backbone", pairs=[],
                                  model_overrides=over))
    model = trainer.model
    assert model.classifier.in_features == model.cfg.video_encoder.output_dim
    torch.testing.assert_close(model.classifier.weight, fresh.classifier.weight, rtol=0, atol=0)  # as initialised
    why = ("random: the classifier reads the video encoder's pooled features (head.video_cls_input='encoder'), "
           "not the space of the class prompts' text embeddings")
    assert json.loads((tmp_path / "probe" / "setup.json").read_text())["head_init"] == why
    trainer.run()
    assert read_log(tmp_path / "probe")[0]["setup"]["head_init"] == why
    # without freezing nothing is said about the head
    plain = Trainer(tiny_config(tiny_data, tmp_path / "plain", max_steps=1, pairs=[], model_overrides=over))
    assert "head_init" not in json.loads((tmp_path / "plain" / "setup.json").read_text()) and plain.head_init is None


def test_drop_path_drops_whole_branches_in_training_only():
    from encoders.video_vit import VideoEncoder, VideoEncoderConfig

    torch.manual_seed(0)
    enc = VideoEncoder(VideoEncoderConfig(**{**SMALL, "depth": 3}, num_frames=4))
    names = sorted(enc.state_dict())
    handles = add_drop_path(enc, 0.5)
    assert len(handles) == 4 and sorted(enc.state_dict()) == names  # blocks 1 and 2; names unchanged
    clips = torch.randn(4, 4, 3, 32, 32)
    enc.eval()
    with torch.no_grad():
        a, b = enc(clips).pooled, enc(clips).pooled
    assert torch.equal(a, b)
    enc.train()
    with torch.no_grad():
        outs = [enc(clips).pooled for _ in range(6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    with pytest.raises(ValueError, match="drop_path"):
        add_drop_path(enc, 1.0)
