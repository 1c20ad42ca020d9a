"""Incremental detokenizer == full `tokenizer.decode(..., skip_special_tokens=True)` after every id."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from assistant.detokenizer import IncrementalDetokenizer, byte_to_unicode_table
from tests.conftest import FIXTURE_INPUTS, load_json

N_RANDOM_SEQUENCES = 300
MAX_SEQUENCE_LEN = 40


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_dir / "llm", local_files_only=True)


@pytest.fixture(scope="module")
def id_pools(tokenizer: Any) -> dict[str, list[int]]:
    """Token ids by kind: partial UTF-8, CJK, emoji-carrying, single bytes, added, plain."""
    char_to_byte = {char: byte for byte, char in byte_to_unicode_table().items()}
    pools: dict[str, list[int]] = {"partial": [], "cjk": [], "emoji": [], "plain": []}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id >= tokenizer.vocab_size:
            continue
        raw = bytes(char_to_byte[char] for char in token)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            pools["partial"].append(token_id)
            continue
        if any("\u4e00" <= char <= "\u9fff" for char in text):
            pools["cjk"].append(token_id)
        elif any(ord(char) >= 0x1F300 for char in text):
            pools["emoji"].append(token_id)
        else:
            pools["plain"].append(token_id)
    vocab = tokenizer.get_vocab()
    table = byte_to_unicode_table()
    pools["byte"] = [vocab[char] for char in table.values()]
    pools["high_byte"] = [vocab[table[byte]] for byte in range(0x80, 0x100)]
    added = tokenizer.added_tokens_decoder
    pools["special"] = [i for i, tok in added.items() if tok.special]
    pools["added"] = [i for i, tok in added.items() if not tok.special]
    pools["unknown"] = [len(tokenizer) + 7, 999_999]
    for name, ids in pools.items():
        assert ids, f"empty id pool {name}"
        ids.sort()
    return pools


def _random_ids(rng: random.Random, pools: dict[str, list[int]]) -> list[int]:
    weights = {"byte": 4, "high_byte": 6, "partial": 6, "cjk": 3, "emoji": 2, "plain": 4,
               "special": 1, "added": 1, "unknown": 0.3}
    names = list(weights)
    length = rng.randint(1, MAX_SEQUENCE_LEN)
    kinds = rng.choices(names, weights=[weights[n] for n in names], k=length)
    return [rng.choice(pools[kind]) for kind in kinds]


def _assert_matches_full_decode(detok: IncrementalDetokenizer, tokenizer: Any, ids: list[int]) -> None:
    detok.reset()
    for n, token_id in enumerate(ids, start=1):
        expected = tokenizer.decode(ids[:n], skip_special_tokens=True)
        got = detok.push(token_id)
        assert got == expected, f"ids {ids[:n]}: {got!r} != {expected!r}"
        assert detok.text == expected


def test_detects_byte_level(tokenizer: Any) -> None:
    assert IncrementalDetokenizer(tokenizer)._byte_level


def test_property_random_ids_match_full_decode(tokenizer: Any, id_pools) -> None:
    rng = random.Random(20241203)
    detok = IncrementalDetokenizer(tokenizer)
    for _ in range(N_RANDOM_SEQUENCES):
        _assert_matches_full_decode(detok, tokenizer, _random_ids(rng, id_pools))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("Hello, world! 你好，世界。😀👍🏽 𠜎 ok\r\n\tend", id="mixed-scripts"),
        pytest.param("ชอบ 제가 измен álbum 骙切れ", id="fixture-scripts"),
    ],
)
def test_split_multibyte_characters(tokenizer: Any, id_pools, text: str) -> None:
    """Every character spelled as single-byte tokens: U+FFFD appears, then is completed."""
    vocab = tokenizer.get_vocab()
    table = byte_to_unicode_table()
    ids = [vocab[table[byte]] for byte in text.encode("utf-8")]
    detok = IncrementalDetokenizer(tokenizer)
    _assert_matches_full_decode(detok, tokenizer, ids)
    assert detok.text == text


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\xed\xaf\xbfA", id="surrogate-held-back-then-invalid"),
        pytest.param(b"\xed\xa0\x80", id="surrogate-3-bytes"),
        pytest.param(b"\xe0\x80\xaf", id="overlong-3"),
        pytest.param(b"\xc0\xafB", id="overlong-2"),
        pytest.param(b"\xf4\x90\x80\x80", id="above-u10ffff"),
        pytest.param(b"\xf0\x9f\x98z", id="truncated-emoji-then-ascii"),
        pytest.param(b"\x80\xbf\xff\xfe", id="stray-continuations-and-ff"),
        pytest.param(b"\xe4\xbd\xe4\xbd\xa0", id="truncated-then-complete"),
    ],
)
def test_ill_formed_utf8_bytes(tokenizer: Any, raw: bytes) -> None:
    """Byte tokens spelling ill-formed UTF-8: same U+FFFD count as the tokenizer at every step."""
    vocab = tokenizer.get_vocab()
    table = byte_to_unicode_table()
    ids = [vocab[table[byte]] for byte in raw]
    _assert_matches_full_decode(IncrementalDetokenizer(tokenizer), tokenizer, ids)


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_fixture_generation_replay(tiny_dir: Path, tokenizer: Any, name: str) -> None:
    generation = load_json(tiny_dir / "expected" / name / "generation.json")
    detok = IncrementalDetokenizer(tokenizer)
    for step in generation["steps"]:
        assert detok.push(step["sampled_id"]) == step["text"], f"step {step['step']}"
    assert detok.text == generation["final_text"]


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_window_fallback_on_fixture(tiny_dir: Path, tokenizer: Any, name: str) -> None:
    generation = load_json(tiny_dir / "expected" / name / "generation.json")
    detok = IncrementalDetokenizer(tokenizer, byte_level=False)
    for step in generation["steps"]:
        assert detok.push(step["sampled_id"]) == step["text"], f"step {step['step']}"
    assert len(detok._window) <= 2 * 16  # bounded: context + pending ids


def test_window_fallback_on_split_characters(tokenizer: Any) -> None:
    vocab = tokenizer.get_vocab()
    table = byte_to_unicode_table()
    ids = [vocab[table[byte]] for byte in "a你好😀b".encode("utf-8")]
    _assert_matches_full_decode(IncrementalDetokenizer(tokenizer, byte_level=False), tokenizer, ids)


class _NoDecodeTokenizer:
    """Delegates everything except `decode`, which must not be needed on the byte-level path."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "decode":
            raise AssertionError("byte-level detokenizer re-decoded the token list")
        return getattr(self._inner, name)


def test_byte_level_never_redecodes(tiny_dir: Path, tokenizer: Any) -> None:
    generation = load_json(tiny_dir / "expected" / FIXTURE_INPUTS[1] / "generation.json")
    detok = IncrementalDetokenizer(_NoDecodeTokenizer(tokenizer))
    for step in generation["steps"]:
        detok.push(step["sampled_id"])
    assert detok.text == generation["final_text"]


def test_reset_starts_a_new_answer(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    vocab = tokenizer.get_vocab()
    detok.push(vocab[byte_to_unicode_table()[0xE4]])  # first byte of a CJK character
    assert detok.text == "\ufffd"
    detok.reset()
    assert detok.text == ""
    ids = tokenizer.encode("Hi", add_special_tokens=False)
    for token_id in ids:
        detok.push(token_id)
    assert detok.text == "Hi"
