"""Frozen-LLM wrapper parity: chat layout, prompt vectors, state head, greedy answer, hidden states."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from assistant.dialogue import Decision, DecisionThresholds, decide
from quantized_models.llm import AudioLlmDims, AudioLlmHeads, ChatLayout, FrozenLlm, LlmKvCache
from quantized_models.strict_load import load_strict
from tests.conftest import FIXTURE_INPUTS, load_json

OFFICIAL_DECISION = {"cl": Decision.CONTINUE, "ss": Decision.RESPOND, "el": Decision.IGNORE}


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = yaml.safe_load((tiny_dir / "checkpoints/audiollm/train.yaml").read_text())
    dims = AudioLlmDims.from_train_yaml(cfg, "train.yaml")
    state = torch.load(tiny_dir / "checkpoints/audiollm/final.pt", map_location="cpu")
    heads = AudioLlmHeads(dims)
    load_strict(heads, {k: v for k, v in state.items() if not k.startswith(("encoder.", "adpter."))},
                "final.pt")
    causal_lm = AutoModelForCausalLM.from_pretrained(tiny_dir / "llm", dtype=torch.float32,
                                                     local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "llm", local_files_only=True)
    layout = ChatLayout.from_template(dims.chat_template, tokenizer)
    return FrozenLlm(causal_lm.eval(), heads.eval(), layout), tokenizer


def test_chat_layout_token_ids(tiny_dir, tiny_llm):
    llm, tokenizer = tiny_llm
    gen = load_json(tiny_dir / "expected/question/generation.json")
    assert list(llm.layout.user_prefix_ids) == gen["prefix_token_ids"]
    assert list(llm.layout.assistant_suffix_ids) == gen["suffix_token_ids"]
    assert llm.layout.end_of_turn_id == gen["eod_id"]
    cache = LlmKvCache()
    assert llm.prefill_system(None, tokenizer, cache) == gen["role_token_ids"]
    assert cache.seq_length == len(gen["role_token_ids"])


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_listen_and_answer_match_official(tiny_dir, tiny_llm, name):
    llm, tokenizer = tiny_llm
    expected = load_file(tiny_dir / f"expected/{name}/llm.safetensors")
    adapter_out = load_file(tiny_dir / f"expected/{name}/encoder.safetensors")["adapter_out"]
    chunks = load_json(tiny_dir / f"expected/{name}/chunks.json")["chunks"]
    gen = load_json(tiny_dir / f"expected/{name}/generation.json")
    weight = llm.heads.prompt_embeddings.weight

    torch.testing.assert_close(llm.embed_tokens(gen["role_token_ids"], weight), expected["pre_inputs_embeds"])
    opening = llm.user_turn_opening(adapter_out[0])
    torch.testing.assert_close(torch.cat([opening, adapter_out[0]]), expected["sl_inputs_embeds"])
    torch.testing.assert_close(llm.embed_tokens(gen["suffix_token_ids"], weight),
                               expected["ss_inputs_embeds"])

    cache = LlmKvCache()
    llm.prefill_system(None, tokenizer, cache)
    logits_all, probs_all = [], []
    for i, vectors in enumerate(adapter_out):
        assert cache.seq_length == chunks[i]["llm_past_len_before"]
        logits, probs = llm.listen(vectors, first_of_turn=(i == 0), cache=cache)
        logits_all.append(logits)
        probs_all.append(probs)
        decision = decide(float(probs[1]), float(probs[2]), DecisionThresholds())
        assert decision is OFFICIAL_DECISION[chunks[i]["decision"]], f"chunk {i}"
    scale = expected["state_logits"].abs().max().item()
    torch.testing.assert_close(torch.stack(logits_all), expected["state_logits"], atol=1e-4 * scale, rtol=0)
    torch.testing.assert_close(torch.stack(probs_all), expected["state_probs"], atol=1e-4, rtol=0)

    assert cache.seq_length == gen["steps"][0]["llm_past_len_before"]
    logits, hidden = llm.start_answer(cache)
    hiddens, ids = [hidden], []
    for step in gen["steps"]:
        if step["input_id"] is not None:
            assert cache.seq_length == step["llm_past_len_before"]
            logits, hidden = llm.feed_token(step["input_id"], cache)
            hiddens.append(hidden)
        top3 = torch.topk(logits.float(), 3)
        assert top3.indices.tolist() == step["top3_ids"]
        ids.append(int(top3.indices[0]))
    assert ids == gen["generated_ids"]
    ref = expected["gen_hidden"]
    torch.testing.assert_close(torch.stack(hiddens), ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


def test_kv_cache_crop_keeps_prefix(tiny_llm):
    llm, tokenizer = tiny_llm
    cache = LlmKvCache()
    llm.prefill_system(None, tokenizer, cache)
    before = cache.seq_length
    llm.start_answer(cache)
    llm.feed_token(100, cache)
    assert cache.seq_length == before + len(llm.layout.assistant_suffix_ids) + 1
    cache.crop(before)
    assert cache.seq_length == before and len(cache.history_ids) == before


def test_the_kv_cache_goes_under_the_keyword_the_installed_transformers_takes(tiny_llm):
    """transformers 5.2x renamed `past_key_values` to `cache` and will drop the old name; the
    wrapper must neither warn about it now nor lose the cache on either side of the rename."""
    import warnings
    from types import SimpleNamespace

    from quantized_models.llm import cache_keyword, run_trunk

    llm, tokenizer = tiny_llm
    cache = LlmKvCache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        llm.prefill_system(None, tokenizer, cache)
        logits, _ = llm.start_answer(cache)
    prefilled = cache.seq_length
    assert prefilled > len(llm.layout.assistant_suffix_ids)

    class OldTrunk(torch.nn.Module):  # a release before the rename
        def forward(self, inputs_embeds, past_key_values=None, use_cache=None):
            return SimpleNamespace(last_hidden_state=inputs_embeds, past_key_values=past_key_values)

    class NewTrunk(torch.nn.Module):  # a release after the old name is gone
        def forward(self, inputs_embeds, cache=None, use_cache=None):
            return SimpleNamespace(last_hidden_state=inputs_embeds, cache=cache)

    embeds = torch.zeros(1, 2, 3)
    for trunk, keyword in ((OldTrunk(), "past_key_values"), (NewTrunk(), "cache")):
        assert cache_keyword(trunk) == keyword
        hidden, past = run_trunk(trunk, embeds, "the cache")
        assert past == "the cache" and hidden is embeds
