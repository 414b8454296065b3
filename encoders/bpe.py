"""CLIP's byte-level BPE, read straight from the vocabulary file that open_clip
ships, without importing open_clip (whose package import pulls in timm and every
model definition: seconds per CLI call).

The algorithm is the GPT-2 / CLIP byte-level BPE: text is cleaned (ftfy, HTML
unescape, whitespace collapsed, lower-cased), split into words by CLIP's
pattern, each word's UTF-8 bytes are mapped to printable characters, the last
symbol gets the ``</w>`` end-of-word marker, and the lowest-ranked adjacent pair
is merged until no ranked pair is left. Token ids are identical to
``open_clip.tokenize`` (tests compare them on a mixed corpus).
"""
from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from pathlib import Path

import ftfy
import regex

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
END_OF_WORD = "</w>"


def default_vocab_path() -> Path:
    """Path of the BPE merges file inside the installed open_clip package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the CLIP BPE vocabulary ({VOCAB_FILE_NAME}) ships with open_clip_torch, "
            "which is not installed: pip install open_clip_torch"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / VOCAB_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path}")
    return path


@lru_cache(maxsize=1)
def printable_bytes() -> dict[int, str]:
    """Map each byte 0..255 to a printable unicode character (reversible).

    Printable Latin-1 bytes map to themselves; the others (controls, space, ...)
    are shifted to code points 256.. in byte order. The dict's order (printable
    bytes first, then the shifted ones) is the order of the first 256 vocabulary
    entries.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def clean_text(text: str) -> str:
    """CLIP's cleaning: ftfy fix, HTML unescape twice, whitespace collapsed, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipBPE:
    """Byte-level BPE with CLIP's vocabulary: ``encode(text) -> list[int]``.

    ``vocab_size`` is 49408: 256 byte symbols, the same with ``</w>``, 48894
    merges, then ``<start_of_text>`` and ``<end_of_text>``.
    """

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path} is not a CLIP BPE merges file ({len(merges)} merges, need {NUM_MERGES})")

        self.byte_to_char = printable_bytes()
        self.char_to_byte = {c: b for b, c in self.byte_to_char.items()}
        symbols = list(self.byte_to_char.values())
        vocab = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
        vocab += [START_OF_TEXT, END_OF_TEXT]
        self.token_to_id = {tok: i for i, tok in enumerate(vocab)}
        self.id_to_token = vocab
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self.vocab_size = len(vocab)
        self.sot_token_id = self.token_to_id[START_OF_TEXT]
        self.eot_token_id = self.token_to_id[END_OF_TEXT]
        self._word_pattern = regex.compile(
            rf"{START_OF_TEXT}|{END_OF_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE,
        )
        self._word_cache: dict[str, list[int]] = {}

    def _merge(self, symbols: list[str]) -> list[str]:
        """Merge the lowest-ranked adjacent pair, everywhere left to right, until none is ranked."""
        rank = self.merge_rank
        while len(symbols) > 1:
            best_pair, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                r = rank.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_pair, best_rank = pair, r
            if best_pair is None:
                break
            first, second = best_pair
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _encode_word(self, word: str) -> list[int]:
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        if word in (START_OF_TEXT, END_OF_TEXT):
            ids = [self.token_to_id[word]]
        else:
            chars = [self.byte_to_char[b] for b in word.encode("utf-8")]
            chars[-1] += END_OF_WORD
            ids = [self.token_to_id[s] for s in self._merge(chars)]
        if len(self._word_cache) < 100_000:
            self._word_cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (cleaned first), without start/end tokens."""
        ids: list[int] = []
        for word in self._word_pattern.findall(clean_text(text)):
            ids.extend(self._encode_word(word))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; every end-of-word marker becomes a space."""
        chars = "".join(self.id_to_token[i] for i in ids)
        raw = bytes(self.char_to_byte[c] for c in chars)
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")
