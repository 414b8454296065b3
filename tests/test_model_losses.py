"""Losses of the ErnieVL model: values against direct formulas, and the distributed gather."""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from ernie_vl.losses import classification_loss, clip_loss, siglip_loss


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


def _losses(a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor | None = None
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    scale, bias = torch.tensor(5.0), torch.tensor(-2.0)
    out = {"clip": clip_loss(a, b, scale), "siglip": siglip_loss(a, b, scale, bias)}
    if groups is not None:
        out.update(clip_grouped=clip_loss(a, b, scale, groups), siglip_grouped=siglip_loss(a, b, scale, bias, groups))
    return out


KINDS = ("clip", "siglip", "clip_grouped", "siglip_grouped")


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    a_all, b_all = _features(b=6, e=8, seed=3)
    b_local = a_all.shape[0] // world
    sl = slice(rank * b_local, (rank + 1) * b_local)
    result = {}
    for kind in KINDS:
        a = a_all[sl].clone().requires_grad_(True)
        b = b_all[sl].clone().requires_grad_(True)
        loss, per_sample = _losses(a, b, GROUPS[sl])[kind]
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
    for kind in KINDS:
        results = [r[kind] for r in ranks]
        a, b = _features(b=6, e=8, seed=3)
        a.requires_grad_(True)
        b.requires_grad_(True)
        loss, per_sample = _losses(a, b, GROUPS)[kind]
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
