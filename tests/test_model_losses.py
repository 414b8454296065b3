"""Losses of the ErnieVL model: values against direct formulas, and the distributed gather."""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from ernie_vl.losses import caption_groups, classification_loss, clip_loss, siglip_loss


def _features(b: int = 5, e: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(b, e, generator=g), dim=-1)
    t = F.normalize(torch.randn(b, e, generator=g), dim=-1)
    return a, t


def test_clip_loss_matches_the_formula() -> None:
    a, b = _features()
    scale = torch.tensor(7.0)
    loss, per_sample = clip_loss(a, b, scale)
    expected = []
    for i in range(a.shape[0]):
        s_ab = [7.0 * float(a[i] @ b[j]) for j in range(a.shape[0])]
        s_ba = [7.0 * float(b[i] @ a[j]) for j in range(a.shape[0])]
        lse_ab = math.log(sum(math.exp(v) for v in s_ab))
        lse_ba = math.log(sum(math.exp(v) for v in s_ba))
        expected.append(0.5 * ((lse_ab - s_ab[i]) + (lse_ba - s_ba[i])))
    assert torch.allclose(per_sample, torch.tensor(expected), atol=1e-5)
    assert loss.item() == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_clip_loss_is_small_for_matched_pairs_and_large_for_shuffled() -> None:
    a, _ = _features(b=6, e=16)
    low, _ = clip_loss(a, a, torch.tensor(100.0))
    high, _ = clip_loss(a, a.roll(1, 0), torch.tensor(100.0))
    assert low.item() < 1e-3
    assert high.item() > 5.0


def test_siglip_loss_matches_the_pairwise_formula() -> None:
    a, b = _features(b=4)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    loss, per_sample = siglip_loss(a, b, scale, bias)
    total = 0.0
    for i in range(4):
        for j in range(4):
            z = 1.0 if i == j else -1.0
            logit = 10.0 * float(a[i] @ b[j]) - 3.0
            total += math.log1p(math.exp(-z * logit))
    # SigLIP: the sum over all pairs divided by the batch size
    assert loss.item() == pytest.approx(total / 4, rel=1e-5)
    assert per_sample.shape == (4,)


def test_classification_loss_with_label_smoothing_matches_the_formula() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    labels = torch.tensor([0, 2])
    eps = 0.1
    loss, per_sample = classification_loss(logits, labels, eps)
    logp = logits.log_softmax(-1)
    expected = (1 - eps) * -logp[torch.arange(2), labels] + eps * -logp.mean(-1)
    assert torch.allclose(per_sample, expected, atol=1e-6)
    assert loss.item() == pytest.approx(expected.mean().item(), abs=1e-6)


def test_bad_loss_inputs_raise_clear_errors() -> None:
    a, b = _features(b=4)
    with pytest.raises(ValueError, match="same"):
        clip_loss(a, b[:3], torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"labels \[5\] out of range; valid: 0..2"):
        classification_loss(torch.zeros(2, 3), torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="integer"):
        classification_loss(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))


GROUPS = torch.tensor([0, 1, 2, 1, 0, 0])  # classes recurring across the two ranks' halves
# captions (token rows, 0 = padding) of the 6 pairs: rows 0 and 4 are one caption (one on each rank's
# half), rows 1 and 2 another (both on rank 0); row 3's tokens start like row 0's but differ
TOKENS = torch.tensor([[5, 7, 9, 0], [5, 8, 0, 0], [5, 8, 0, 0], [5, 7, 9, 3], [5, 7, 9, 0], [6, 0, 0, 0]])
UNIQUE = torch.tensor([[5, 7, 0], [5, 8, 0], [6, 0, 0], [5, 7, 9], [4, 0, 0], [6, 1, 0]])


def _losses(a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor | None = None
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    scale, bias = torch.tensor(5.0), torch.tensor(-2.0)
    out = {"clip": clip_loss(a, b, scale), "siglip": siglip_loss(a, b, scale, bias)}
    if groups is not None:
        out.update(clip_grouped=clip_loss(a, b, scale, groups), siglip_grouped=siglip_loss(a, b, scale, bias, groups))
    return out


KINDS = ("clip", "siglip", "clip_grouped", "siglip_grouped", "caption_clip_grouped", "caption_siglip_grouped")


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    a_all, b_all = _features(b=6, e=8, seed=3)
    b_local = a_all.shape[0] // world
    sl = slice(rank * b_local, (rank + 1) * b_local)
    # rank 0 holds its captions in a narrower tensor (its longest caption is shorter): same captions, same ids
    tokens = TOKENS[sl][:, :3] if rank == 0 else TOKENS[sl]
    result = {"caption_groups": caption_groups(tokens), "unique": caption_groups(UNIQUE[sl])}
    for kind in KINDS:
        a = a_all[sl].clone().requires_grad_(True)
        b = b_all[sl].clone().requires_grad_(True)
        groups = result["caption_groups"] if kind.startswith("caption_") else GROUPS[sl]
        loss, per_sample = _losses(a, b, groups)[kind.removeprefix("caption_")]
        loss.backward()
        result[kind] = {"loss": loss.detach(), "per_sample": per_sample.detach(), "ga": a.grad, "gb": b.grad}
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


def test_gathered_losses_on_two_ranks_equal_one_process_with_the_global_batch() -> None:
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out = os.path.join(tmp, "init"), os.path.join(tmp, "res")
        mp.start_processes(_worker, args=(world, init_file, out), nprocs=world, start_method="spawn")
        ranks = [torch.load(f"{out}.{r}") for r in range(world)]
    # identical captions share an id on both ranks, numbered as one process numbers the global batch
    one = caption_groups(TOKENS)
    assert one.tolist() == [0, 2, 2, 1, 0, 3]  # distinct rows in sorted order: [5,7,9,0] < [5,7,9,3] < [5,8,...
    assert torch.cat([r["caption_groups"] for r in ranks]).tolist() == one.tolist()
    assert caption_groups(UNIQUE) is None and all(r["unique"] is None for r in ranks)  # unique: plain pairs
    for kind in KINDS:
        results = [r[kind] for r in ranks]
        a, b = _features(b=6, e=8, seed=3)
        a.requires_grad_(True)
        b.requires_grad_(True)
        loss, per_sample = _losses(a, b, one if kind.startswith("caption_") else GROUPS)[kind.removeprefix("caption_")]
        loss.backward()
        # the mean of the ranks' losses is the global loss; per-sample losses are the global ones
        assert torch.allclose(torch.stack([r["loss"] for r in results]).mean(), loss.detach(), atol=1e-6)
        assert torch.allclose(torch.cat([r["per_sample"] for r in results]), per_sample.detach(), atol=1e-6)
        # after DDP's averaging over ranks (/ world) the gradients equal the global batch's
        assert torch.allclose(torch.cat([r["ga"] for r in results]) / world, a.grad, atol=1e-6)
        assert torch.allclose(torch.cat([r["gb"] for r in results]) / world, b.grad, atol=1e-6)


def test_grouped_clip_loss_makes_every_same_class_pair_a_positive() -> None:
    """Clips paired with class prompts: a batch of 6 clips of 3 classes holds 2 clips (and 2 prompts) per
    class; each row's target is spread over its class's candidates (ActionCLIP), not its own one."""
    a, b = _features(b=6, e=8, seed=3)
    groups = torch.tensor([0, 1, 0, 2, 1, 2])
    scale = torch.tensor(5.0)
    loss, per_sample = clip_loss(a, b, scale, groups)
    expected = []
    for i in range(6):
        same = [j for j in range(6) if groups[j] == groups[i]]
        row = []
        for x, y in ((a, b), (b, a)):
            s = [5.0 * float(x[i] @ y[j]) for j in range(6)]
            lse = math.log(sum(math.exp(v) for v in s))
            row.append(sum(lse - s[j] for j in same) / len(same))
        expected.append(0.5 * sum(row))
    assert torch.allclose(per_sample, torch.tensor(expected), atol=1e-5)
    assert loss.item() == pytest.approx(sum(expected) / 6, abs=1e-5)
    # all groups distinct: exactly CLIP's pairs
    plain, _ = clip_loss(a, b, scale)
    assert clip_loss(a, b, scale, torch.arange(6))[0].item() == pytest.approx(plain.item(), abs=1e-6)


def test_grouped_loss_pulls_a_clip_toward_its_class_prompts_instead_of_pushing() -> None:
    """Clip 0 and clip 1 share a class but were given different prompts of it: ungrouped InfoNCE pushes
    clip 0 away from clip 1's prompt (a false negative); grouped, gradient descent moves it closer."""
    a, b = _features(b=4, e=8, seed=5)
    for groups, sign in ((None, 1.0), (torch.tensor([0, 0, 1, 2]), -1.0)):
        x = a.clone().requires_grad_(True)
        clip_loss(x, b, torch.tensor(10.0), groups)[0].backward()
        toward_prompt_1 = float(x.grad[0] @ b[1])  # > 0: a descent step lowers a_0 . b_1
        assert toward_prompt_1 * sign > 0
    # SigLIP: the same-class pair counts as a positive (its term is -log sigmoid(+z), not -log sigmoid(-z))
    bias = torch.tensor(-1.0)
    grouped, _ = siglip_loss(a, b, torch.tensor(3.0), bias, torch.tensor([0, 0, 1, 2]))
    z = 3.0 * a @ b.t() + bias
    signs = -torch.ones(4, 4)
    signs[[0, 0, 1, 1, 2, 3], [0, 1, 0, 1, 2, 3]] = 1.0
    manual = 0.5 * (-F.logsigmoid(signs * z).sum(1) - F.logsigmoid(signs * z.t()).sum(1))
    assert grouped.item() == pytest.approx(manual.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="groups must be"):
        clip_loss(a, b, torch.tensor(1.0), torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_identical_captions_are_positives_by_hand() -> None:
    """Three pairs, captions 0 and 2 identical: by hand, InfoNCE's row 0 target is (1/2, 0, 1/2) over the
    texts, and text 0's target likewise over the images; SigLIP labels the (0, 2) and (2, 0) pairs positive."""
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    b = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    tokens = torch.tensor([[3, 4, 0], [3, 5, 6], [3, 4, 0]])
    groups = caption_groups(tokens)
    assert groups is not None and groups[0] == groups[2] != groups[1]
    # scale 2: s_ij = 2 a_i . b_j
    s = [[1.6, 0.0, 2.0], [1.2, 2.0, 0.0], [1.92, 1.6, 1.2]]
    st = [[s[j][i] for j in range(3)] for i in range(3)]  # text i against image j
    pos = [[0, 2], [1], [0, 2]]
    expected = []
    for i in range(3):
        terms = [sum(math.log(sum(math.exp(v) for v in m[i])) - m[i][j] for j in pos[i]) / len(pos[i]) for m in (s, st)]
        expected.append(0.5 * sum(terms))
    loss, per_sample = clip_loss(a, b, torch.tensor(2.0), groups)
    assert per_sample.tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[0] == pytest.approx(0.5 * (0.5 * (2 * math.log(math.exp(1.6) + 1 + math.exp(2.0)) - 3.6)
                                               + 0.5 * (2 * math.log(math.exp(1.6) + math.exp(1.2) + math.exp(1.92))
                                                        - 1.6 - 1.92)), abs=1e-6)
    plain, _ = clip_loss(a, b, torch.tensor(2.0))
    assert loss.item() < plain.item()  # image 0 matching text 2 (its caption) is no longer counted as an error
    bias = -1.0
    total = 0.0
    for i in range(3):
        for j in range(3):
            z = 1.0 if j in pos[i] else -1.0
            total += math.log1p(math.exp(-z * (s[i][j] + bias))) + math.log1p(math.exp(-z * (st[i][j] + bias)))
    sig, _ = siglip_loss(a, b, torch.tensor(2.0), torch.tensor(bias), groups)
    assert sig.item() == pytest.approx(0.5 * total / 3, abs=1e-6)


def test_caption_groups_ignore_padding_width_and_refuse_bad_tokens(monkeypatch) -> None:
    assert caption_groups(torch.tensor([[3, 4], [3, 5]])) is None
    assert caption_groups(torch.tensor([[3, 4, 0, 0], [3, 4, 0, 0], [2, 0, 0, 0]])).tolist() == [1, 1, 0]
    # keys that collide for different captions: the tokens themselves decide
    import ernie_vl.losses as losses

    monkeypatch.setattr(losses, "_row_keys", lambda t: torch.zeros(t.shape[0], 2, dtype=torch.int64))
    assert caption_groups(torch.tensor([[3, 4], [3, 5]])) is None
    assert caption_groups(torch.tensor([[3, 4, 0], [3, 5, 0], [3, 4, 0]])).tolist() == [0, 1, 0]
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"caption tokens must be \(B, L\) integers, got \(4,\)"):
        caption_groups(torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="float32"):
        caption_groups(torch.zeros(2, 3))


def test_infonce_gradient_is_unchanged_when_repeated_captions_embed_alike() -> None:
    """Why InfoNCE never saw a contradiction: when copies of a caption have one embedding, the copies'
    columns tie in every softmax, and the grouped and plain losses agree in value and in the gradient of
    everything upstream (the per-sample split differs). SigLIP's does not: its copies were negatives."""
    a0, t0 = _features(b=5, e=8, seed=7)
    rows = torch.tensor([0, 1, 0, 2, 0])  # texts 0, 2 and 4 are one caption
    groups = caption_groups(rows[:, None])
    results = {}
    for name in ("clip", "siglip"):
        for grouped in (False, True):
            a, t = a0.clone().requires_grad_(True), t0[:3].clone().requires_grad_(True)
            g = groups if grouped else None
            if name == "clip":
                loss, per_sample = clip_loss(a, t[rows], torch.tensor(4.0), g)
            else:
                loss, per_sample = siglip_loss(a, t[rows], torch.tensor(4.0), torch.tensor(-2.0), g)
            loss.backward()
            results[name, grouped] = (loss.detach(), per_sample.detach(), a.grad, t.grad)
    plain, grouped = results["clip", False], results["clip", True]
    assert torch.allclose(plain[0], grouped[0], atol=1e-6)
    assert torch.allclose(plain[2], grouped[2], atol=1e-6) and torch.allclose(plain[3], grouped[3], atol=1e-6)
    assert (plain[1] - grouped[1]).abs().max() > 1e-3
    plain, grouped = results["siglip", False], results["siglip", True]
    assert abs(float(plain[0] - grouped[0])) > 1e-3 and (plain[3] - grouped[3]).abs().max() > 1e-3
