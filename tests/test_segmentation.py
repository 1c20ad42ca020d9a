"""Answer segmentation (spec §6.1, §14.2–14.4) and TTS text normalisation (spec §6.2)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from assistant.detokenizer import IncrementalDetokenizer
from assistant.segmentation import Segment, SegmentationRule, Segmenter, normalize_tts_text
from tests.conftest import FIXTURE_INPUTS, load_json


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_dir / "llm", local_files_only=True)


def _hidden(step: int) -> torch.Tensor:
    """Dummy [llm_dim] hidden state that remembers its step."""
    return torch.full((4,), float(step))


def _run(rule: SegmentationRule, texts: list[str], **kwargs: Any) -> list[Segment]:
    """Push full texts (one per token, the start-speaking token first), then finish."""
    segmenter = Segmenter(rule, **kwargs)
    segments = [seg for i, text in enumerate(texts) if (seg := segmenter.push(text, _hidden(i)))]
    if (last := segmenter.finish()) is not None:
        segments.append(last)
    return segments


def _texts(segments: list[Segment]) -> list[str]:
    return [seg.text for seg in segments]


def _sizes(segments: list[Segment]) -> list[int]:
    return [len(seg.hidden_states) for seg in segments]


def _cumulative(pieces: list[str]) -> list[str]:
    return [("".join(pieces[: i + 1])) for i in range(len(pieces))]


# -- fixture replay -------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_sentence_rule_reproduces_fixture_segments(tiny_dir: Path, tokenizer: Any, name: str) -> None:
    generation = load_json(tiny_dir / "expected" / name / "generation.json")
    expected = load_json(tiny_dir / "expected" / name / "segments.json")["segments"]
    detok = IncrementalDetokenizer(tokenizer)
    segmenter = Segmenter(SegmentationRule.SENTENCE)
    segments: list[Segment] = []
    for step in generation["steps"]:
        assert step["stat_out"] == "cs"  # both answers end at the token cap, not <|im_end|>
        text = detok.push(step["sampled_id"])
        assert text == step["text"]
        if (segment := segmenter.push(text, _hidden(step["step"]))) is not None:
            segments.append(segment)
    if (segment := segmenter.finish()) is not None:
        segments.append(segment)

    assert _texts(segments) == [seg["raw_text"] for seg in expected]
    assert _sizes(segments) == [seg["n_hidden_states"] for seg in expected]
    order = [float(h[0]) for seg in segments for h in seg.hidden_states]
    assert order == [float(i) for i in range(len(generation["steps"]))]
    for segment, seg in zip(segments, expected):
        normalized = normalize_tts_text(segment.text)
        assert normalized == seg["text"]
        assert tokenizer.encode(normalized, add_special_tokens=False) == seg["ids"]


# -- rule behaviour ---------------------------------------------------------------------------


def test_first_delta_covers_two_tokens() -> None:
    # "A." alone would close a segment, but the first token's text waits for the second token.
    segments = _run(SegmentationRule.SENTENCE, ["A.", "A. B", "A. B."])
    assert _texts(segments) == ["A. B."]
    assert _sizes(segments) == [3]


def test_first_two_token_delta_ending_with_dot_does_not_crash() -> None:
    # Official inference.py indexes last_text[-1] on an empty string here (spec §14.4).
    segments = _run(SegmentationRule.SENTENCE, ["Hi", "Hi.", "Hi. Yo"])
    assert _texts(segments) == ["Hi.", " Yo"]
    assert _sizes(segments) == [2, 1]


def test_dot_after_digit_does_not_close() -> None:
    texts = _cumulative(["Step", " 3", ".", " Go", "!"])
    assert _texts(_run(SegmentationRule.SENTENCE, texts)) == ["Step 3. Go!"]


def test_final_segment_with_hidden_states_but_no_text() -> None:
    # A token that adds no text after a closed segment (e.g. a special token) is left over.
    segments = _run(SegmentationRule.SENTENCE, ["Hi", "Hi.", "Hi."])
    assert _texts(segments) == ["Hi.", ""]
    assert _sizes(segments) == [2, 1]
    assert normalize_tts_text("") == ""  # the caller decides what to do with it


def test_only_start_speaking_token() -> None:
    segments = _run(SegmentationRule.SENTENCE, ["Hello"])
    assert _texts(segments) == [""] and _sizes(segments) == [1]
    assert Segmenter(SegmentationRule.SENTENCE).finish() is None


def test_sentence_keeps_replacement_char_when_completion_adds_no_length() -> None:
    # Spec §14.3: "A" + first byte of 你 shows "A\ufffd"; completing it keeps the length.
    segments = _run(SegmentationRule.SENTENCE, ["A", "A\ufffd", "A你", "A你。"])
    assert _texts(segments) == ["A\ufffd。"]


def test_eager_skips_deltas_with_replacement_char() -> None:
    segments = _run(SegmentationRule.EAGER, ["A", "A\ufffd", "A你", "A你。"])
    assert _texts(segments) == ["A你。"]
    assert _sizes(segments) == [4]


def test_eager_needs_four_hidden_states() -> None:
    texts = _cumulative(["Hi", ".", " Ok", " yes", ".", " No", "."])
    assert _texts(_run(SegmentationRule.SENTENCE, texts)) == ["Hi.", " Ok yes.", " No."]
    eager = _run(SegmentationRule.EAGER, texts)
    assert _texts(eager) == ["Hi. Ok yes.", " No."]
    assert _sizes(eager) == [5, 2]


def test_eager_comma_closes_only_the_first_segment() -> None:
    texts = _cumulative(["Well", ",", " yes", ",", " then", " a", " b", ",", " c", "."])
    assert _texts(_run(SegmentationRule.SENTENCE, texts)) == ["Well, yes, then a b, c."]
    eager = _run(SegmentationRule.EAGER, texts)
    assert _texts(eager) == ["Well, yes,", " then a b, c."]
    assert _sizes(eager) == [4, 6]


def test_eager_comma_closes_a_long_segment() -> None:
    first = ["One", " two", " three", "."]
    words = [f" w{i}" for i in range(18)]
    texts = _cumulative(first + words + [",", " x", ","])
    eager = _run(SegmentationRule.EAGER, texts)
    # Second segment: 18 words + "," = 19 hidden states (no cut), then " x" and "," = 21.
    assert _texts(eager) == ["One two three.", "".join(words) + ", x,"]
    assert _sizes(eager) == [4, 21]


def test_eager_colon_is_comma_class() -> None:
    texts = _cumulative(["Note", " this", " well", ":", " ok", "."])
    assert _texts(_run(SegmentationRule.EAGER, texts)) == ["Note this well:", " ok."]


def test_segment_cap_and_reuse_after_finish() -> None:
    segmenter = Segmenter(SegmentationRule.SENTENCE, max_segment_tokens=3)
    texts = _cumulative(["a", " b", " c", " d", " e"])
    out = [seg for i, t in enumerate(texts) if (seg := segmenter.push(t, _hidden(i)))]
    assert _texts(out) == ["a b c"] and _sizes(out) == [3]
    leftover = segmenter.finish()
    assert leftover is not None and leftover.text == " d e" and len(leftover.hidden_states) == 2
    assert segmenter.finish() is None
    again = [seg for i, t in enumerate(["X", "X."]) if (seg := segmenter.push(t, _hidden(i)))]
    assert _texts(again) == ["X."]
    with pytest.raises(ValueError):
        Segmenter(SegmentationRule.EAGER, max_segment_tokens=1)


# -- normalisation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("步骤如下：1. 打开 2. 关闭", "步骤如下：1：打开 2：关闭。", id="cjk-list"),
        pytest.param("第1.第2", "第1：第2。", id="cjk-list-no-space"),
        pytest.param("圆周率是3.14", "圆周率是3.14。", id="cjk-decimal-kept"),
        pytest.param("Steps: 1. Open 2. Close", "Steps:1:Open 2:Close。", id="english-list"),
        pytest.param("Pi is 3.14", "Pi is 3:14。", id="english-decimal-official-quirk"),
        pytest.param("e.g. this", "e.g.this。", id="space-after-dot"),
        pytest.param("你好（世界）(hi)", "你好，世界，,hi。", id="brackets"),
        pytest.param("苹果、香蕉、", "苹果，香蕉。", id="enumeration-comma"),
        pytest.param("Hello,", "Hello。", id="trailing-comma"),
        pytest.param("你好，", "你好。", id="trailing-fullwidth-comma"),
        pytest.param("a;", "a。", id="trailing-semicolon"),
        pytest.param("结论：", "结论。", id="trailing-fullwidth-colon"),
        pytest.param("Done.", "Done.", id="terminated-dot"),
        pytest.param("Why?", "Why?", id="terminated-question"),
        pytest.param("好！", "好！", id="terminated-fullwidth"),
        pytest.param("好。\n\n", "好。", id="terminated-after-newlines"),
        pytest.param("**bold** _x_ `code` ~y~", "bold x code y。", id="markdown-marks"),
        pytest.param("a\nb\tc\rd", "abcd。", id="control-whitespace"),
        pytest.param("text   ", "text   。", id="trailing-spaces-kept"),
        pytest.param("", "", id="empty"),
    ],
)
def test_normalize_tts_text(raw: str, expected: str) -> None:
    assert normalize_tts_text(raw) == expected
