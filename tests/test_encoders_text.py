import pytest
import torch

from encoders import TextEmbedding, get_tokenizer


def test_tokenizer_shape_dtype_and_special_tokens():
    tok = get_tokenizer()
    ids = tok(["a photo of a dog", "cat"])
    assert ids.shape == (2, 77) and ids.dtype == torch.int64
    assert tok.vocab_size == 49408 and tok.sot_token_id == 49406 and tok.eot_token_id == 49407
    assert ids[0, 0].item() == 49406
    n = len(tok.encode("a photo of a dog"))
    assert ids[0, n + 1].item() == 49407 and ids[0, n + 2 :].eq(0).all()
    assert tok.decode(ids[0]) == "a photo of a dog"


def test_tokenizer_matches_open_clip_and_takes_a_single_string():
    import open_clip

    tok = get_tokenizer()
    assert torch.equal(tok("Hello, World!"), open_clip.tokenize(["Hello, World!"]))


def test_tokenizer_truncates_and_custom_context():
    tok = get_tokenizer(context_length=8)
    ids = tok("one two three four five six seven eight nine ten")
    assert ids.shape == (1, 8) and ids[0, -1].item() == tok.eot_token_id


@pytest.mark.parametrize("bad", [3, [1, 2], None])
def test_tokenizer_rejects_non_strings(bad):
    with pytest.raises(TypeError):
        get_tokenizer()(bad)


def test_text_embedding_values():
    emb = TextEmbedding(vocab_size=100, width=8, context_length=10)
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = emb(tokens)
    assert out.shape == (2, 3, 8)
    expected = emb.token_embedding.weight[tokens] + emb.positional_embedding[:3]
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "tokens,err,match",
    [
        (torch.zeros(2, 11, dtype=torch.int64), ValueError, "11"),
        (torch.zeros(11, dtype=torch.int64), ValueError, r"\(B, L\)"),
        (torch.full((1, 3), 100), ValueError, "100"),
        (torch.zeros(1, 3), TypeError, "float32"),
    ],
)
def test_text_embedding_rejects_bad_tokens(tokens, err, match):
    with pytest.raises(err, match=match):
        TextEmbedding(vocab_size=100, width=8, context_length=10)(tokens)


MIXED_CORPUS = [
    "a photo of a dog",
    "A small RED circle left of a large blue square.",
    "  many   spaces\tand\nnewlines  ",
    "it's what we've said they'll do, isn't it? I'm sure you'd agree",
    "numbers 12345 and 3.14159, dates 2026-11-28",
    "HTML &amp; entities &lt;b&gt; &amp;amp; double",
    "café naïve façade — «quotes» “curly” ‘single’",
    "emoji 🐶🏖️ and symbols ©®™ ±∞",
    "日本語のテキスト 中文 한국어",
    "mojibake fix: cafÃ© ",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "<start_of_text> literal specials <end_of_text>",
    "",
    "!!!???...,,,;;;",
    "word " * 100,
]


def test_own_bpe_matches_open_clip_on_a_mixed_corpus():
    import open_clip

    for context_length in (77, 8):
        ours = get_tokenizer(context_length)(MIXED_CORPUS)
        theirs = open_clip.tokenize(MIXED_CORPUS, context_length=context_length)
        assert torch.equal(ours, theirs), context_length


def test_tokenizer_does_not_import_open_clip():
    import subprocess
    import sys

    code = (
        "import sys; from encoders.text import get_tokenizer; "
        "ids = get_tokenizer()('a dog'); "
        "assert 'open_clip' not in sys.modules, 'open_clip imported'; print(ids[0, :4].tolist())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[49406, 320, 1929, 49407]"


def test_bpe_decode_round_trips():
    from encoders.bpe import ClipBPE

    bpe = ClipBPE()
    text = "café naïve 🐶 it's 42"
    assert bpe.decode(bpe.encode(text)).strip() == "café naïve 🐶 it 's 4 2"
