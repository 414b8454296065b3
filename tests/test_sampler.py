"""Loss-priority sampler: probabilities, sharding across ranks, resume."""
from __future__ import annotations

import pytest
import torch

from ernie_vl.train.sampler import PrioritySampler


def test_probabilities_follow_loss_power_mixed_with_uniform():
    s = PrioritySampler(4, alpha=2.0, eps=0.1, uniform_mix=0.2)
    s.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0.0, 1.0, 2.0, 3.0]))
    w = (torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64) + 0.1) ** 2
    expected = 0.8 * w / w.sum() + 0.2 / 4
    torch.testing.assert_close(s.probabilities(), expected, rtol=0, atol=1e-12)
    assert float(s.probabilities().sum()) == pytest.approx(1.0)


def test_unseen_samples_count_as_the_highest_loss():
    s = PrioritySampler(3, alpha=1.0, eps=0.0 + 1e-9, uniform_mix=0.0)
    s.update(torch.tensor([0, 1]), torch.tensor([1.0, 3.0]))
    p = s.probabilities().tolist()
    assert p[2] == pytest.approx(p[1]) and p[1] == pytest.approx(3 * p[0], rel=1e-6)


def test_empirical_frequencies_match_probabilities():
    s = PrioritySampler(5, alpha=1.0, eps=0.01, uniform_mix=0.1, seed=1)
    s.update(torch.arange(5), torch.tensor([0.1, 0.2, 0.4, 0.8, 1.6]))
    draws = torch.cat([s.sample_global(1) for _ in range(5000)])
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    torch.testing.assert_close(freq, s.probabilities(), atol=0.02, rtol=0)


def test_ema_update_and_non_finite_losses_ignored():
    s = PrioritySampler(2, ema=0.5)
    s.update(torch.tensor([0, 1]), torch.tensor([2.0, 4.0]))
    s.update(torch.tensor([0, 1]), torch.tensor([4.0, float("nan")]))
    assert s.losses.tolist() == [3.0, 4.0]


def test_ranks_share_one_global_batch_in_contiguous_slices():
    losses = torch.rand(50)
    samplers = [PrioritySampler(50, seed=7, rank=r, world_size=2) for r in range(2)]
    single = PrioritySampler(50, seed=7)
    for step in range(5):
        parts = [s.sample(8) for s in samplers]
        whole = single.sample(8)
        assert torch.equal(torch.cat(parts), whole)
        assert len(set(whole.tolist())) == 8  # no repeats inside a batch
        for s in samplers + [single]:
            s.update(whole, losses[whole])
    with pytest.raises(ValueError, match="divisible"):
        samplers[0].sample(7)


def test_uniform_kind_is_shuffled_epochs():
    s = PrioritySampler(10, kind="uniform", seed=0)
    first = torch.cat([s.sample(5), s.sample(5)])
    assert sorted(first.tolist()) == list(range(10))
    assert torch.equal(s.probabilities(), torch.full((10,), 0.1, dtype=torch.float64))


def test_state_dict_resumes_exactly():
    a = PrioritySampler(30, seed=3, ema=0.3)
    for _ in range(3):
        idx = a.sample(6)
        a.update(idx, idx.double() / 10)
    b = PrioritySampler(30, seed=99, ema=0.3)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        ia, ib = a.sample(6), b.sample(6)
        assert torch.equal(ia, ib)
        a.update(ia, ia.double()); b.update(ib, ib.double())
    with pytest.raises(ValueError, match="kind"):
        PrioritySampler(30, kind="uniform").load_state_dict(a.state_dict())


@pytest.mark.parametrize("kwargs", [dict(num_samples=0), dict(num_samples=3, kind="lossy"),
                                    dict(num_samples=3, uniform_mix=1.5), dict(num_samples=3, rank=2, world_size=2)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        PrioritySampler(**kwargs)


def test_relative_losses_rank_by_hardness_within_the_step_not_by_age():
    """An early batch (every loss high) must not outrank a later sample that is hard for the model now."""
    absolute = PrioritySampler(4, alpha=1.0, eps=1e-9, uniform_mix=0.0)
    relative = PrioritySampler(4, alpha=1.0, eps=1e-9, uniform_mix=0.0, relative=True)
    for s in (absolute, relative):
        s.update(torch.tensor([0, 1]), torch.tensor([4.0, 4.0]))  # step 1: loss level 4, both average
        s.update(torch.tensor([2, 3]), torch.tensor([1.0, 3.0]))  # step 90: level 2, sample 3 hard now
    torch.testing.assert_close(relative.losses, torch.tensor([1.0, 1.0, 0.5, 1.5], dtype=torch.float64))
    p_abs, p_rel = absolute.probabilities(), relative.probabilities()
    assert int(p_abs.argmax()) in (0, 1)  # absolute losses favour the stale early samples
    assert int(p_rel.argmax()) == 3
    torch.testing.assert_close(p_rel, torch.tensor([1.0, 1.0, 0.5, 1.5], dtype=torch.float64) / 4.0)


def test_relative_state_must_match_on_resume():
    s = PrioritySampler(3, relative=True)
    s.update(torch.tensor([0, 1]), torch.tensor([1.0, 3.0]))
    again = PrioritySampler(3, relative=True)
    again.load_state_dict(s.state_dict())
    assert torch.equal(again.losses.nan_to_num(-1), s.losses.nan_to_num(-1))
    with pytest.raises(ValueError, match="relative"):
        PrioritySampler(3).load_state_dict(s.state_dict())
