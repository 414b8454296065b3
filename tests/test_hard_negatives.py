"""Caption-neighbour batches (in-batch hard negatives): features, composition, duplicates, resume, trainer."""
from __future__ import annotations

import itertools

import pytest
import torch

from ernie_vl.preprocess import make_tokenizer
from ernie_vl.train.hard_negatives import HardNegativeSampler, caption_features
from ernie_vl.train.sampler import PrioritySampler

COLOURS = ("red", "green", "blue", "cyan", "white", "black")
SHAPES = ("circle", "square", "star", "cross")
PLACES = ("at the top", "at the bottom", "on the left", "on the right")


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [f"a {s} {c} {k} {p}" for s, c, k, p in itertools.product(("small", "large"), COLOURS, SHAPES, PLACES)]


@pytest.fixture(scope="module")
def tokens(captions) -> torch.Tensor:
    return make_tokenizer(49408, 16)(captions)


def _words(caption: str) -> list[str]:
    return caption.split()


def _differing_words(a: str, b: str) -> int:
    return sum(x != y for x, y in zip(_words(a), _words(b))) + abs(len(_words(a)) - len(_words(b)))


def test_features_are_unit_norm_and_order_sensitive():
    tok = make_tokenizer(49408, 16)(["a red circle left of a blue square", "a blue square left of a red circle",
                                     "a red circle left of a blue square", "a green star"])
    f = caption_features(tok)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(4))
    sim = f @ f.t()
    assert float(sim[0, 2]) == pytest.approx(1.0, abs=1e-6)  # identical captions
    assert 0.5 < float(sim[0, 1]) < 0.999  # same words, other order: near, not equal (bigrams differ)
    assert float(sim[0, 3]) < float(sim[0, 1])
    # a reused buffer gives the same features
    buf = torch.full((4, f.shape[1]), 7.0)
    torch.testing.assert_close(caption_features(tok, out=buf), f)


def test_groups_are_nearest_neighbours_of_their_seed(captions, tokens):
    n = len(captions)
    base = PrioritySampler(n, kind="uniform", seed=3)
    sampler = HardNegativeSampler(base, tokens, share=0.5, group=4, pool=n, seed=3)
    ids = sampler.sample_global(32).tolist()
    assert len(ids) == 32 and len(set(ids)) == 32
    feats = caption_features(tokens)
    near, far = [], []
    for g in range(4):  # 0.5 * 32 / 4 groups
        seed, members = ids[4 * g], ids[4 * g + 1:4 * g + 4]
        sims = feats[seed] @ feats.t()
        sims[seed] = -1
        best = float(sims.topk(12).values[-1])  # the pool is the whole set: members are among the closest
        for m in members:
            assert float(feats[seed] @ feats[m]) >= best - 1e-6
            near.append(_differing_words(captions[seed], captions[m]))
    for a, b in zip(ids[16:-1], ids[17:]):  # the rest: the sampler's own (random) draws
        far.append(_differing_words(captions[a], captions[b]))
    assert max(near) <= 2 and sum(near) / len(near) < sum(far) / len(far)


def test_no_caption_appears_twice_in_a_batch():
    caps = ["a red circle", "a red circle", "a red circle", "a blue circle", "a green circle", "a red square",
            "a blue square", "a green square", "a red star", "a blue star"]
    tok = make_tokenizer(49408, 8)(caps)
    sampler = HardNegativeSampler(PrioritySampler(len(caps), kind="uniform", seed=0), tok, share=1.0, group=2,
                                  pool=len(caps), seed=0)
    for _ in range(20):
        ids = sampler.sample_global(6).tolist()
        assert len(ids) == 6
        assert len({caps[i] for i in ids}) == 6


def test_fewer_distinct_captions_than_the_batch_still_fills_it():
    caps = ["a red circle"] * 5 + ["a blue square"] * 5
    tok = make_tokenizer(49408, 8)(caps)
    sampler = HardNegativeSampler(PrioritySampler(10, kind="uniform", seed=0), tok, share=1.0, group=2, pool=10)
    ids = sampler.sample_global(8)
    assert ids.shape == (8,) and int(ids.min()) >= 0 and int(ids.max()) < 10
    assert {caps[i] for i in ids.tolist()} == {"a red circle", "a blue square"}


def test_resume_repeats_the_same_draws(captions, tokens):
    def make():
        return HardNegativeSampler(PrioritySampler(len(captions), kind="uniform", seed=1), tokens, share=0.5,
                                   group=4, pool=64, seed=1)

    a = make()
    a.sample_global(16)
    state = a.state_dict()
    expected = [a.sample_global(16) for _ in range(3)]
    b = make()
    b.load_state_dict(state)
    for want in expected:
        assert torch.equal(b.sample_global(16), want)
    with pytest.raises(ValueError, match="hard-negative generator"):
        make().load_state_dict(PrioritySampler(len(captions), kind="uniform").state_dict())


@pytest.mark.parametrize("kwargs, match", [(dict(share=1.5), "share"), (dict(group=1), "group"),
                                           (dict(group=4, pool=2), "pool")])
def test_bad_settings_are_refused(captions, tokens, kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardNegativeSampler(PrioritySampler(len(captions), kind="uniform"), tokens, **kwargs)


def test_tokens_must_match_the_sampler(tokens):
    with pytest.raises(ValueError, match="tokens must be"):
        HardNegativeSampler(PrioritySampler(5, kind="uniform"), tokens)
