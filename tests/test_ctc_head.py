"""`train ctc-head` on the tiny chain's frozen encoder, its export, and `transcribe` decoding with it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests import test_training
from tests.test_training import _loop, _losses
from training.ctc_head import CTC_HEAD_NAME, CtcHeadConfig, load_ctc_head, train_ctc_head
from training.transcribe import (CTC_WEIGHT_KEY, DEFAULT_CTC_NBEST, DEFAULT_CTC_WEIGHT, CtcDecoding,
                                 model_ctc_decoding)

chain = test_training.chain  # the tiny stage 1 -> 2 -> 3 -> export chain, once for this module too


@pytest.fixture(scope="module")
def head_run(chain: dict, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ctc") / "run"
    train_ctc_head(chain["root"] / "run3", chain["data"], run,
                   CtcHeadConfig(loop=_loop(40, 1e-2), batch_utterances=4, hidden=16))
    return run


def test_the_head_learns(head_run: Path) -> None:
    losses = _losses(head_run, "ctc_loss")
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    head = load_ctc_head(head_run / CTC_HEAD_NAME)
    assert head.dims.hidden == 16 and not head.training


def test_its_frames_are_the_ones_the_engine_streams(chain: dict, head_run: Path) -> None:
    from quantized_models.encoder import EncoderCache
    from quantized_models.model_dir import load_models
    from training.ctc_head import ctc_log_probs
    from training.features import load_wav, utterance_chunks

    models = load_models(chain["model_dir"], chain["llm_dir"], torch.device("cpu"), torch.float32)
    head = load_ctc_head(head_run / CTC_HEAD_NAME)
    chunks = utterance_chunks(load_wav(chain["data"] / "wav/u1.wav"))
    cache = EncoderCache()
    with torch.inference_mode():
        steps = [models.encoder.step(chunks[k:k + 1], cache)[0] for k in range(chunks.shape[0])]
        streamed = torch.cat(steps, 1)
        expected = head(streamed)[0]
    got = ctc_log_probs(models.encoder, head, chunks)
    assert got.shape == (4 * chunks.shape[0], 1 + len(head.dims.symbols))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_head_looks_ahead_no_further_than_its_lookahead(head_run: Path) -> None:
    head = load_ctc_head(head_run / CTC_HEAD_NAME)
    ahead = head.dims.layers * head.dims.lookahead_frames
    assert ahead == 12  # the recipe's default: 3 convolutions, 4 frames ahead each
    frames = torch.randn(1, 40, head.dims.model_dim)
    changed = frames.clone()
    changed[:, 30:] = torch.randn(1, 10, head.dims.model_dim)
    torch.testing.assert_close(head(frames)[:, :30 - ahead], head(changed)[:, :30 - ahead])
    assert not torch.allclose(head(frames)[:, 30 - ahead:], head(changed)[:, 30 - ahead:])


@pytest.mark.parametrize("lookahead", [1, 2])
def test_a_lookahead_head_sees_exactly_its_lookahead(lookahead: int) -> None:
    """Each of the 2 convolutions sees `lookahead` frames ahead, so frame t reads frames up to
    t + 2 × lookahead and none after; a change at frame 20 moves frames 20 − 2 × lookahead on."""
    from training.ctc_head import CtcHead, CtcHeadDims

    head = CtcHead(CtcHeadDims(model_dim=8, hidden=12, kernel_frames=5, lookahead_frames=lookahead)).eval()
    frames = torch.randn(1, 30, 8)
    changed = frames.clone()
    changed[:, 20] = torch.randn(8)  # not a constant shift, which the LayerNorm removes
    first_moved = 20 - 2 * lookahead
    with torch.inference_mode():
        before, after = head(frames)[0], head(changed)[0]
    torch.testing.assert_close(before[:first_moved], after[:first_moved])
    assert not torch.allclose(before[first_moved], after[first_moved])
    with pytest.raises(ValueError, match="lookahead_frames must be 0 to kernel_frames - 1"):
        CtcHead(CtcHeadDims(model_dim=8, kernel_frames=3, lookahead_frames=3))


def test_dropout_reaches_every_convolution_after_the_first_while_training() -> None:
    from training.ctc_head import CtcHead, CtcHeadDims

    head = CtcHead(CtcHeadDims(model_dim=8, hidden=64, kernel_frames=3, layers=3), dropout=0.5)
    dropped: dict[int, list[float]] = {}

    def zero_share(index: int):
        def hook(_module, inputs):  # the padded input; its middle frames are all real activations
            dropped.setdefault(index, []).append((inputs[0][:, :, 2:-2] == 0).float().mean().item())
        return hook

    for i, conv in enumerate(head.convs):
        conv.register_forward_pre_hook(zero_share(i))
    frames = torch.randn(2, 50, 8)
    head.train()(frames)
    head.eval()(frames)
    assert dropped[0] == [0.0, 0.0]  # the encoder's frames go in whole
    for i in (1, 2):
        assert 0.4 < dropped[i][0] < 0.6 and dropped[i][1] == 0.0  # half dropped in training, none in eval


def test_speed_perturbed_copies_join_the_training_set(chain: dict, tmp_path: Path) -> None:
    summary = train_ctc_head(chain["root"] / "run3", chain["data"], tmp_path / "speed",
                             CtcHeadConfig(loop=_loop(2), batch_utterances=2, hidden=8, speed_factors=(0.9,)))
    unperturbed = train_ctc_head(chain["root"] / "run3", chain["data"], tmp_path / "plain",
                                 CtcHeadConfig(loop=_loop(2), batch_utterances=2, hidden=8))
    assert summary["train_utterances"] == 2 * unperturbed["train_utterances"] > 0
    with pytest.raises(ValueError, match="not 1"):
        train_ctc_head(chain["root"] / "run3", chain["data"], tmp_path / "one",
                       CtcHeadConfig(loop=_loop(2), speed_factors=(1.0,)))


def test_export_carries_the_head_and_transcribe_decodes_with_it(chain: dict, head_run: Path, tmp_path: Path,
                                                                monkeypatch) -> None:
    import training.transcribe as transcribe_module
    from assistant.cli import main
    from training.export import export_model_dir

    model = export_model_dir(chain["root"] / "run3", tmp_path / "model",
                             speech_from=chain["model_dir"], ctc_head=head_run / CTC_HEAD_NAME)
    assert (model / CTC_HEAD_NAME).is_file()
    assert json.loads((model / "TRAINING.json").read_text())[CTC_WEIGHT_KEY] == DEFAULT_CTC_WEIGHT
    decoding = model_ctc_decoding(model)
    assert isinstance(decoding, CtcDecoding) and decoding.weight == DEFAULT_CTC_WEIGHT
    assert model_ctc_decoding(model, 0.0) is None and model_ctc_decoding(chain["model_dir"]) is None
    assert model_ctc_decoding(model, 0.5).weight == 0.5
    with pytest.raises(ValueError, match="0 \\(off\\) or positive"):
        model_ctc_decoding(model, -1.0)

    # a model directory as the source carries its head along
    again = export_model_dir(model, tmp_path / "again", speech_from=chain["model_dir"])
    assert (again / CTC_HEAD_NAME).read_bytes() == (model / CTC_HEAD_NAME).read_bytes()

    seen = []
    real = transcribe_module.transcribe
    monkeypatch.setattr(transcribe_module, "transcribe", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    args = ["--model-dir", str(model), "--llm-dir", str(chain["llm_dir"])]
    wav = str(chain["data"] / "wav/u0.wav")
    assert main(["transcribe", *args, "--input", wav]) == 0
    assert main(["transcribe", *args, "--input", wav, "--ctc-weight", "0"]) == 0
    assert main(["transcribe", *args, "--input", wav, "--ctc-nbest", "0"]) == 0
    assert seen[0]["ctc"].weight == DEFAULT_CTC_WEIGHT and seen[1]["ctc"] is None
    assert seen[0]["ctc"].nbest == DEFAULT_CTC_NBEST and seen[2]["ctc"].nbest == 0
    with pytest.raises(ValueError, match="n-best"):
        model_ctc_decoding(model, nbest=-1)


@pytest.mark.parametrize("text, heard, strays", [
    ("The bus to Denver leaves at ten.", "the bus to denver leaves at ten", False),
    ("The bus to Denver leaves at 10.", "the bus to denver leaves at ten", False),  # one word off
    ("The r l o d e r, please.", "the rolo der please", True),  # spelled out
    ("I have a dog at 5 p.", "i have a dog at five p", False),  # "a", "I", digits and one letter
    ("The rai a a a a a.", "the rai a a a a a", True),  # loops, even where the head loops too
    ("Dad, I saw a lion.", "dad i saw a lion", False),
    ("Dad, I saw a lion.", "does anyone smoke", True),  # most characters differ
    ("How many stars fit into a car?", "how many stickers fit into a birthday card", False),  # 14 of 42
    ("Hello.", "", True),  # the head hears nothing
])
def test_a_joint_transcript_strays_from_the_head_where_it_should(text: str, heard: str, strays: bool) -> None:
    from training.transcribe import strays_from_head

    assert strays_from_head(text, heard) is strays


def test_a_stray_transcript_gives_way_to_the_heads_own(chain: dict, head_run: Path, monkeypatch) -> None:
    import math

    import training.ctc_head as ctc_head_module
    import training.transcribe as transcribe_module
    from quantized_models.model_dir import load_models
    from training.eval import normalise_words
    from training.features import CharVocab, load_wav

    vocab, heard, path = CharVocab(), "hello there", []
    for symbol in vocab.encode(heard):
        path += [vocab.BLANK, symbol] if path and path[-1] == symbol else [symbol]  # "ll" needs a blank
    log_probs = torch.full((len(path), 1 + len(vocab.SYMBOLS)), math.log(0.01 / len(vocab.SYMBOLS)))
    for t, symbol in enumerate(path):
        log_probs[t, symbol] = math.log(0.99)
    monkeypatch.setattr(ctc_head_module, "ctc_log_probs", lambda *args: log_probs)  # the head hears it
    models = load_models(chain["model_dir"], chain["llm_dir"], torch.device("cpu"), torch.float32)
    decoding = CtcDecoding(load_ctc_head(head_run / CTC_HEAD_NAME), 1e-6, nbest=0)  # the tiny LLM decides
    samples = load_wav(chain["data"] / "wav/u1.wav")
    replaced = transcribe_module.transcribe(models, samples, ctc=decoding)
    monkeypatch.setattr(transcribe_module, "strays_from_head", lambda text, heard: False)
    joint = transcribe_module.transcribe(models, samples, ctc=decoding)
    assert replaced == "Hello there"
    assert normalise_words(joint) != heard.split()  # the tiny LLM's own transcript


def test_a_broken_or_missing_head_is_refused(chain: dict, head_run: Path, tmp_path: Path) -> None:
    from training.export import export_model_dir

    with pytest.raises(FileNotFoundError, match="train ctc-head"):
        load_ctc_head(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"dims": {"model_dim": 4}}, bad)
    with pytest.raises(ValueError, match="not a CTC head"):
        load_ctc_head(bad)
    with pytest.raises(ValueError, match="not a CTC head"):
        export_model_dir(chain["root"] / "run3", tmp_path / "model", speech_from=chain["model_dir"],
                         ctc_head=bad)
    assert not (tmp_path / "model").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="stage-1 result"):
        train_ctc_head(chain["root"] / "run1", chain["data"], tmp_path / "r", CtcHeadConfig(loop=_loop(2)))


KEPT_HEADS = ("ctc_head.pt", "ctc_head-speed.pt", "ctc_head-dropout.pt", "ctc_head-both.pt")


def test_the_kept_ctc_heads_read_the_kept_encoder() -> None:
    """training/artifacts/speech-input/ctc_head*.pt were trained on the kept result's encoder:
    `train export --init .../result.pt --ctc-head .../ctc_head*.pt` needs the widths to agree."""
    from training.model_config import load_result

    kept = Path(__file__).resolve().parents[1] / "training/artifacts/speech-input"
    encoder_conf = load_result(kept / "result.pt")["train_yaml"]["encoder_conf"]
    encoder_width = encoder_conf["overview_conf"]["encoder-output-dim"]
    for name in KEPT_HEADS:
        head = load_ctc_head(kept / name)
        assert head.dims.model_dim == encoder_width and (kept / name).stat().st_size < 7e6


def _random_head(seed: int, model_dim: int = 8, lookahead: int = 1):
    from training.ctc_head import CtcHead, CtcHeadDims

    torch.manual_seed(seed)
    dims = CtcHeadDims(model_dim=model_dim, hidden=12, kernel_frames=3, lookahead_frames=lookahead)
    return CtcHead(dims).eval()


def test_an_ensemble_is_the_renormalised_mean_of_its_heads_log_probabilities(tmp_path: Path) -> None:
    from training.ctc_head import CtcHeadEnsemble, save_ctc_head

    heads = [_random_head(0), _random_head(1, lookahead=0)]
    frames = torch.randn(2, 11, 8)
    together = CtcHeadEnsemble(heads).eval()
    with torch.inference_mode():
        apart = [h(frames) for h in heads]
        out = together(frames)
    assert torch.allclose(out, ((apart[0] + apart[1]) / 2).log_softmax(-1))
    assert torch.allclose(out.exp().sum(-1), torch.ones(2, 11))  # a distribution per frame
    assert not any(torch.allclose(out, a, atol=1e-3) for a in apart)

    save_ctc_head(together, tmp_path / "both.pt", {"why": "test"})
    loaded = load_ctc_head(tmp_path / "both.pt")
    assert isinstance(loaded, CtcHeadEnsemble) and len(loaded.heads) == 2
    with torch.inference_mode():
        assert torch.allclose(loaded(frames), out, atol=2e-2)  # stored as float16
    with pytest.raises(ValueError, match="encoder widths"):
        CtcHeadEnsemble([_random_head(0), _random_head(1, model_dim=6)])
    with pytest.raises(ValueError, match="at least one"):
        CtcHeadEnsemble([])
    assert len(CtcHeadEnsemble([together, heads[0]]).heads) == 3  # an ensemble joins with its heads


def test_export_writes_several_heads_as_one_ensemble(chain: dict, head_run: Path, tmp_path: Path) -> None:
    from assistant.cli import main
    from training.ctc_head import CtcHeadEnsemble, save_ctc_head

    one = load_ctc_head(head_run / CTC_HEAD_NAME)
    torch.manual_seed(3)
    other = type(one)(one.dims).eval()  # another head of the same shape
    save_ctc_head(other, tmp_path / "other.pt")
    model = tmp_path / "model"
    assert main(["train", "export", "--init", str(chain["root"] / "run3"), "--out", str(model),
                 "--speech-from", str(chain["model_dir"]),
                 "--ctc-head", str(head_run / CTC_HEAD_NAME), str(tmp_path / "other.pt")]) == 0
    decoding = model_ctc_decoding(model)
    assert isinstance(decoding.head, CtcHeadEnsemble) and len(decoding.head.heads) == 2
    frames = torch.randn(1, 9, one.dims.model_dim)
    with torch.inference_mode():
        expected = ((one(frames) + load_ctc_head(tmp_path / "other.pt")(frames)) / 2).log_softmax(-1)
        assert torch.allclose(decoding.head(frames), expected, atol=1e-5)
    assert main(["transcribe", "--model-dir", str(model), "--llm-dir", str(chain["llm_dir"]),
                 "--input", str(chain["data"] / "wav/u0.wav")]) == 0  # the ensemble decodes
