"""Incremental detokenization (pipeline/engine/text.py): the `tokenizers` DecodeStream path and the re-decoding
window give the same text as decoding all ids at once, with multi-byte characters split across tokens, special
tokens, random ids and stop strings."""
from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from pipeline.engine import text as text_mod
from pipeline.engine.text import Detokenizer
from pipeline.models.sources import save_byte_tokenizer

TEXTS = ["Hello, world! Ünïcödé 你好 🙂🙂\n\n  code:\tdef f(x): return x**2", "émoji 👍🏽 mixed, ends in é",
         "  leading spaces and trailing  "]


def _text(tok, ids, stream: bool, stop=()) -> tuple[str, bool]:
    d = Detokenizer(tok, list(stop))
    if not stream:
        d._stream = None                     # the re-decoding window
    hit = any(d.add(i) for i in ids)
    return d.text, hit


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("bytetok")
    save_byte_tokenizer(out, 300)
    return AutoTokenizer.from_pretrained(str(out))


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def test_fast_tokenizers_take_the_decode_stream(byte_tok):
    if text_mod.DecodeStream is None:
        pytest.skip("tokenizers has no DecodeStream")
    assert Detokenizer(byte_tok, [])._stream is not None
    assert Detokenizer(None, [])._stream is None


@pytest.mark.parametrize("which", ["byte_tok", "smol_tok"])
def test_streamed_text_equals_whole_decode(which, request):
    tok = request.getfixturevalue(which)
    rng = random.Random(0)
    for t in TEXTS:
        ids = tok(t, add_special_tokens=False).input_ids
        whole = tok.decode(ids, skip_special_tokens=True)
        assert _text(tok, ids, True)[0] == whole == _text(tok, ids, False)[0]
    for _ in range(60):                       # any ids, special ones included: both paths agree
        ids = [rng.randrange(len(tok)) for _ in range(40)]
        assert _text(tok, ids, True)[0] == _text(tok, ids, False)[0]


def test_stop_string_cuts_the_streamed_text(byte_tok):
    ids = byte_tok("abc 你好 STOP after", add_special_tokens=False).input_ids
    for stream in (True, False):
        text, hit = _text(byte_tok, ids, stream, stop=["STOP"])
        assert hit and text == "abc 你好 "
