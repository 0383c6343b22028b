"""The batched signal forward pass against hand-computed answers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from middo_pipeline.core import forward
from middo_pipeline.core.encoding import encode_sample
from middo_pipeline.core.forward import make_batches, mean_response_loss, score_samples
from middo_pipeline.models.loading import load_model
from middo_pipeline.models.tiny import build_tiny_model

PROMPTS = [
    "What is 12 times 7?",
    "Explain the difference between a list and a tuple in Python. Give an example of each.",
    "Summarize the passage in one sentence.\n\nParis is the capital of France. Water boils at 100 degrees.",
    "a",
    "Write a short poem about autumn leaves falling in the quiet evening, in four lines.",
    "Score from 0 to 10.",
]
RESPONSES = [
    "12 times 7 is 84.",
    "A list can change; a tuple cannot. [1, 2] and (1, 2).",
    "Paris is the capital of France.",
    "b",
    "Leaves fall\nin the quiet evening\nbrown and red\nautumn is here.",
    "7",
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-fwd") / "model")
    return load_model(str(path), device="cpu", dtype="float32")


def hand_loss_and_embedding(model, tok, prompt, response, max_length=512):
    """Plain full-model forward of one sample: logits -> log_softmax -> gather -> mean over the
    response positions; embedding = mean of the decoder's last hidden state over the prompt."""
    e = encode_sample(tok, prompt, response, max_length)
    ids = torch.tensor([e.input_ids])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0].double(), dim=-1)
    rs, re_ = e.response_span
    positions = torch.arange(rs, re_)
    token_lp = logp[positions - 1, ids[0, positions]]
    loss = float(-token_lp.mean()) if re_ > rs else float("nan")
    ps, pe = e.prompt_span
    hidden = out.hidden_states[-1][0]  # after the final norm, as the decoder returns it
    with torch.no_grad():
        assert torch.allclose(hidden, model.get_decoder()(input_ids=ids).last_hidden_state[0], atol=1e-6)
    emb = hidden[ps:pe].double().mean(0).numpy()
    return loss, emb, re_ - rs


def test_loss_and_embedding_equal_hand_computation(lm):
    res = score_samples(lm.model, lm.tokenizer, PROMPTS, RESPONSES)
    assert res.loss.dtype == np.float32 and res.loss.shape == (len(PROMPTS),)
    assert res.embedding.dtype == np.float32 and res.embedding.shape == (len(PROMPTS), lm.model.config.hidden_size)
    assert res.head == "fast"
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        loss, emb, n = hand_loss_and_embedding(lm.model, lm.tokenizer, p, r)
        assert res.loss[i] == pytest.approx(loss, abs=1e-5)
        assert res.n_response_tokens[i] == n
        np.testing.assert_allclose(res.embedding[i], emb, atol=1e-5)
    assert res.n_tokens == sum(
        len(encode_sample(lm.tokenizer, p, r, 512).input_ids) - 1  # minus the trailing "\n"
        for p, r in zip(PROMPTS, RESPONSES)
    )
    assert res.seconds > 0 and not res.truncated.any()


def test_padding_invariance(lm):
    """A sample's loss and embedding do not depend on what it is batched with."""
    alone = [score_samples(lm.model, lm.tokenizer, [p], [r]) for p, r in zip(PROMPTS, RESPONSES)]
    together = score_samples(lm.model, lm.tokenizer, PROMPTS, RESPONSES, max_batch_tokens=100_000)
    # with very long and very short neighbours
    long_p, long_r = "Explain lists. " * 40, "Lists change. " * 60
    mixed = score_samples(
        lm.model, lm.tokenizer, [long_p] + PROMPTS + ["x"], [long_r] + RESPONSES + ["y"], max_batch_tokens=100_000
    )
    for i, a in enumerate(alone):
        np.testing.assert_allclose(together.loss[i], a.loss[0], atol=1e-5)
        np.testing.assert_allclose(together.embedding[i], a.embedding[0], atol=1e-5)
        np.testing.assert_allclose(mixed.loss[i + 1], a.loss[0], atol=1e-5)
        np.testing.assert_allclose(mixed.embedding[i + 1], a.embedding[0], atol=1e-5)


def test_order_preserved_with_bucketing(lm):
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog 12 times 7 is 84".split()
    prompts = [" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(23)]
    responses = [" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(23)]
    calls = []
    res = score_samples(
        lm.model,
        lm.tokenizer,
        prompts,
        responses,
        max_batch_tokens=150,
        max_batch_size=4,
        progress=lambda done, total: calls.append((done, total)),
    )
    ref = score_samples(lm.model, lm.tokenizer, prompts, responses, max_batch_tokens=10**6, max_batch_size=1)
    np.testing.assert_allclose(res.loss, ref.loss, atol=1e-5)
    np.testing.assert_allclose(res.embedding, ref.embedding, atol=1e-5)
    for i in (0, 7, 22):
        single = score_samples(lm.model, lm.tokenizer, [prompts[i]], [responses[i]])
        np.testing.assert_allclose(res.loss[i], single.loss[0], atol=1e-5)
    # several batches, progress after each, monotone, ending at (N, N)
    assert len(calls) > 5
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and calls[-1] == (23, 23)
    assert all(t == 23 for _, t in calls)


def test_make_batches_budget_and_cover():
    lengths = [5, 100, 30, 30, 7, 64, 1, 250, 12]
    batches = make_batches(lengths, max_batch_tokens=128, max_batch_size=3)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    for b in batches:
        assert len(b) <= 3
        assert len(b) * max(lengths[i] for i in b) <= 128 or len(b) == 1  # an over-long sample alone
    with pytest.raises(ValueError):
        make_batches(lengths, max_batch_tokens=0, max_batch_size=3)


def test_no_response_token_gives_nan(lm):
    tok = lm.tokenizer
    full = encode_sample(tok, PROMPTS[1], RESPONSES[1], 512)
    cut = full.response_span[0] + 3  # room for prompt + framing only: the response is dropped
    res = score_samples(lm.model, tok, [PROMPTS[1], PROMPTS[0]], [RESPONSES[1], None], max_length=cut - 3)
    assert np.isnan(res.loss).all() and (res.n_response_tokens == 0).all()
    assert res.truncated.tolist() == [True, False]
    assert np.isfinite(res.embedding).all()
    # a partly truncated response: the loss over the tokens that are left
    res = score_samples(lm.model, tok, [PROMPTS[1]], [RESPONSES[1]], max_length=cut)
    assert res.n_response_tokens[0] == 3 and res.truncated[0]
    assert res.loss[0] == pytest.approx(
        hand_loss_and_embedding(lm.model, tok, PROMPTS[1], RESPONSES[1], cut)[0], abs=1e-5
    )


def test_without_embeddings_and_mean_response_loss(lm):
    res = score_samples(lm.model, lm.tokenizer, PROMPTS, RESPONSES, with_embeddings=False)
    assert res.embedding is None
    ref = score_samples(lm.model, lm.tokenizer, PROMPTS, RESPONSES)
    np.testing.assert_allclose(res.loss, ref.loss, atol=1e-6)
    mrl = mean_response_loss(lm.model, lm.tokenizer, PROMPTS, RESPONSES)
    assert mrl.embedding is None
    np.testing.assert_allclose(mrl.loss, ref.loss, atol=1e-6)


def test_full_head_path_agrees(lm):
    fast = score_samples(lm.model, lm.tokenizer, PROMPTS, RESPONSES, head="fast")
    full = score_samples(lm.model, lm.tokenizer, PROMPTS, RESPONSES, head="full")
    assert (fast.head, full.head) == ("fast", "full")
    np.testing.assert_allclose(fast.loss, full.loss, atol=1e-5)
    np.testing.assert_allclose(fast.embedding, full.embedding, atol=1e-5)


def test_training_mode_model_is_scored_in_eval_mode_and_restored(lm):
    ref = score_samples(lm.model, lm.tokenizer, PROMPTS[:2], RESPONSES[:2])
    lm.model.train()
    try:
        res = score_samples(lm.model, lm.tokenizer, PROMPTS[:2], RESPONSES[:2])
        assert lm.model.training
    finally:
        lm.model.eval()
    np.testing.assert_allclose(res.loss, ref.loss, atol=1e-6)


def test_empty_input(lm):
    res = score_samples(lm.model, lm.tokenizer, [], [])
    assert res.loss.shape == (0,) and res.embedding.shape == (0, lm.model.config.hidden_size)


# ----------------------------------------------------------------------------------------------
# output-head transforms: the fast path must match what the model class computes


def _arch_model(kind: str, vocab: int, tok):
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
    )

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if kind == "gemma2-softcap":
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, final_logit_softcapping=2.0))
    elif kind == "cohere-logit-scale":
        model = CohereForCausalLM(CohereConfig(**common, logit_scale=0.25))
    else:
        model = GraniteForCausalLM(GraniteConfig(**common, logits_scaling=4.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)  # large logits, so that the transform matters
    return model.eval()


@pytest.mark.parametrize("kind", ["gemma2-softcap", "cohere-logit-scale", "granite-logits-scaling"])
def test_logit_transforms_are_applied(lm, kind, monkeypatch):
    tok = lm.tokenizer
    model = _arch_model(kind, lm.model.config.vocab_size, tok)
    fast = score_samples(model, tok, PROMPTS, RESPONSES, head="fast", with_embeddings=False)
    truth = np.array([hand_loss_and_embedding(model, tok, p, r)[0] for p, r in zip(PROMPTS, RESPONSES)])
    np.testing.assert_allclose(fast.loss, truth, rtol=1e-4, atol=1e-4)
    # and the transform is not a no-op here: without it the losses differ
    monkeypatch.setattr(forward, "head_transform", lambda m: lambda x: x)
    raw = score_samples(model, tok, PROMPTS, RESPONSES, head="fast", with_embeddings=False)
    assert np.abs(raw.loss - truth).max() > 0.05


def test_unknown_head_trick_falls_back_to_full_model(lm, monkeypatch, caplog):
    """A model whose logits are post-processed in a way the fast path does not know."""
    tok = lm.tokenizer
    model = _arch_model("granite-logits-scaling", lm.model.config.vocab_size, tok)
    monkeypatch.setattr(forward, "head_transform", lambda m: lambda x: x)  # pretend we do not know it
    truth = np.array([hand_loss_and_embedding(model, tok, p, r)[0] for p, r in zip(PROMPTS, RESPONSES)])
    with caplog.at_level("WARNING"):
        res = score_samples(model, tok, PROMPTS, RESPONSES)
    assert res.head == "full" and "using the full model" in caplog.text
    np.testing.assert_allclose(res.loss, truth, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_seed_like_samples():
    lm = load_model(device="cpu")
    prompts = [
        "Give three tips for staying healthy.",
        "What are the three primary colors?",
        "Describe the structure of an atom.",
        "How can we reduce air pollution?",
        "Translate the sentence into French.\n\nThe cat sleeps on the sofa.",
        "Write a haiku about the sea.",
        "Explain why the sky is blue in one sentence.",
        "Add 17 and 25.",
    ]
    responses = [
        "1. Eat a balanced diet. 2. Exercise regularly. 3. Get enough sleep.",
        "The three primary colors are red, blue and yellow.",
        "An atom has a nucleus of protons and neutrons, surrounded by electrons.",
        "Use public transport, switch to clean energy and plant trees.",
        "Le chat dort sur le canapé.",
        "Waves fold on the shore\nsalt wind carries gull voices\nthe tide breathes and goes",
        "Air molecules scatter blue sunlight more than red light, so the sky looks blue.",
        "17 + 25 = 42.",
    ]
    res = score_samples(lm.model, lm.tokenizer, prompts, responses, max_length=256)
    assert np.isfinite(res.loss).all()
    assert ((res.loss > 0.1) & (res.loss < 10)).all(), res.loss
    assert res.embedding.shape == (8, 576) and np.isfinite(res.embedding).all()
    assert res.head == "fast"


@pytest.mark.parametrize("pooling, layer", [("mean", "middle"), ("last", "last"), ("last", "middle"), ("mean", 1)])
def test_embedding_pooling_and_layer_equal_hand_computation(lm, pooling, layer):
    from middo_pipeline.core.forward import EmbeddingSpec

    spec = EmbeddingSpec(pooling=pooling, layer=layer)
    res = score_samples(lm.model, lm.tokenizer, PROMPTS, RESPONSES, embedding=spec, max_batch_tokens=100_000)
    plain = score_samples(lm.model, lm.tokenizer, PROMPTS, RESPONSES)
    np.testing.assert_allclose(res.loss, plain.loss, atol=1e-6)  # the loss does not change
    n_layers = lm.model.config.num_hidden_layers
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        e = encode_sample(lm.tokenizer, p, r, 512)
        with torch.no_grad():
            out = lm.model(input_ids=torch.tensor([e.input_ids]), output_hidden_states=True)
        # hidden_states[j] is the output of layer j (the last one after the final norm)
        j = n_layers if layer == "last" else (n_layers + 1) // 2 if layer == "middle" else layer
        hidden = out.hidden_states[j][0].double()
        ps, pe = e.prompt_span
        want = hidden[ps:pe].mean(0) if pooling == "mean" else hidden[pe - 1]
        np.testing.assert_allclose(res.embedding[i], want.numpy(), atol=1e-4)


def test_embedding_spec_validates():
    from middo_pipeline.core.forward import EmbeddingSpec

    with pytest.raises(ValueError, match="pooling"):
        EmbeddingSpec(pooling="max")
    with pytest.raises(ValueError, match="layer"):
        EmbeddingSpec(layer="first")
    assert EmbeddingSpec(layer="3").layer == 3
    assert EmbeddingSpec(layer="middle").layer_index(30) == 14 and EmbeddingSpec(layer="middle").layer_index(2) == 0
    with pytest.raises(ValueError, match="does not exist"):
        EmbeddingSpec(layer=5).layer_index(2)
