"""Optimizer LLM backends: LocalBackend on a tiny model, OpenAIBackend against a real local
HTTP server (fake_openai_server) with scripted failures."""

from __future__ import annotations

import logging
import time
import uuid

import pytest

from middo_pipeline.core.llm import make_backend
from middo_pipeline.core.llm.local import DEFAULT_MODEL, INT8_SCHEME, LocalBackend
from middo_pipeline.core.llm.openai_compat import OpenAIBackend
from middo_pipeline.core.llm.protocol import BackendUnavailable, ChatRequest, truncate_at_stop
from middo_pipeline_tests.core.fake_openai_server import (
    Reply,
    chat_ok,
    closed_port,
    error,
)

KEY_ENV = "MIDDO_TEST_OPENAI_KEY"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def req(text: str, **kw) -> ChatRequest:
    return ChatRequest.from_messages([{"role": "user", "content": text}], **kw)


# ---------------------------------------------------------------------------------------------
# LocalBackend
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lively_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with large random weights: its (junk) text depends on the prompt, so
    order and batching mistakes show. The default init answers newlines to everything."""
    import torch

    from middo_pipeline.models.loading import load_model

    lm = load_model(str(tiny_model_dir), device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    target = tmp_path_factory.mktemp("lively") / "model"
    lm.model.save_pretrained(target)
    lm.tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def local(lively_model_dir):
    return LocalBackend(str(lively_model_dir), device="cpu", batch_size=4)


PROMPTS = [
    "hi",
    "Explain the difference between a list and a tuple in Python, with an example of each.",
    "What is 12 times 7?",
    "Paris is the capital of France. Water boils at 100 degrees Celsius at sea level. Summarize.",
    "x",
    "Write a short poem about autumn leaves falling in the quiet evening.",
]


def test_default_model_name_matches_loading():
    from middo_pipeline.models import loading

    assert DEFAULT_MODEL == loading.DEFAULT_MODEL
    assert LocalBackend().backend_id == f"local:{loading.DEFAULT_MODEL}"  # no load, no conversion


def test_local_order_batching_and_determinism(local, lively_model_dir):
    reqs = [req(p, max_tokens=12) for p in PROMPTS]
    calls = []
    out = local.complete(reqs, progress=lambda d, t: calls.append((d, t)))
    assert len(out) == len(reqs) and all(c.ok for c in out)
    assert len({c.text for c in out}) > 1, "texts should differ per prompt"
    # batch 4 over mixed lengths == one by one (greedy), in the same order
    single = LocalBackend(str(lively_model_dir), device="cpu", batch_size=1, loaded=local.loaded)
    assert [c.text for c in single.complete(reqs)] == [c.text for c in out]
    # greedy is deterministic
    assert [c.text for c in local.complete(reqs)] == [c.text for c in out]
    assert calls[-1] == (len(reqs), len(reqs)) and len(calls) == 2  # one call per batch
    assert all(c.usage["completion_tokens"] <= 12 and c.usage["prompt_tokens"] > 0 for c in out)
    assert local.backend_id.startswith(f"local:{lively_model_dir.resolve()}@")


def test_local_backend_id_changes_when_the_folder_is_rewritten(tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    first = LocalBackend(str(folder)).backend_id
    assert first == LocalBackend(str(folder)).backend_id  # stable while nothing changes
    (folder / "model.safetensors").write_bytes(b"y" * 11)  # a new round's checkpoint, same path
    assert LocalBackend(str(folder)).backend_id != first
    shutil.rmtree(folder)
    assert LocalBackend(str(folder)).backend_id == f"local:{folder}"  # gone: the name only


def test_local_int8_quantize_is_a_setting_with_its_own_cache_key(lively_model_dir):
    import torch

    plain = LocalBackend(str(lively_model_dir), device="cpu", batch_size=4)
    q = LocalBackend(str(lively_model_dir), device="cpu", batch_size=4, quantize="int8")
    # different text, different cache entries (and another int8 scheme, other entries again)
    assert q.backend_id == plain.backend_id + f"?quantize={INT8_SCHEME}"
    assert q.path_name == "int8_batch_4" and plain.path_name == "compact_batch_4"
    assert LocalBackend(batch_size=8, engine="generate").path_name == "transformers_generate"
    out = q.complete([req(p, max_tokens=8) for p in PROMPTS])
    assert all(c.ok and c.usage["finish_reason"] in ("stop", "length") for c in out)
    kinds = {name.rsplit(".", 1)[-1]: type(m) for name, m in q.loaded.model.named_modules() if name}
    assert ".quantized.dynamic." in kinds["up_proj"].__module__ and ".quantized.dynamic." in kinds["q_proj"].__module__
    # the MLP's output projection and the head keep fp32: int8 activations there broke the model
    assert kinds["down_proj"] is torch.nn.Linear and kinds["lm_head"] is torch.nn.Linear
    with pytest.raises(ValueError, match="quantize"):
        LocalBackend(quantize="int4")


def test_local_prefill_excluded_and_continued(local):
    import torch

    prefill = "Final prompt:"
    r = req("Explain the difference between a list and a tuple.", max_tokens=10, prefill=prefill)
    got = local.complete([r])[0]
    assert got.ok
    # the same as continuing template + prefill by hand, minus the prompt and the prefill
    lm = local.loaded
    text = lm.tokenizer.apply_chat_template(r.as_messages(), tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = lm.tokenizer(text + prefill, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=10,
            do_sample=False,
            repetition_penalty=1.1,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    eos = lm.tokenizer.eos_token_id
    if eos in new:
        new = new[: new.index(eos)]
    assert got.text == lm.tokenizer.decode(new, skip_special_tokens=True)
    assert not got.text.startswith(prefill)
    assert (
        got.text != local.complete([req("Explain the difference between a list and a tuple.", max_tokens=10)])[0].text
    )


def test_local_stop_strings(local):
    r = req(PROMPTS[1], max_tokens=24)
    full = local.complete([r])[0].text
    stop = full[6:9]
    assert len(stop) == 3 and stop in full
    cut = local.complete([req(PROMPTS[1], max_tokens=24, stop=(stop,))])[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.usage["completion_tokens"] < 24  # generation stopped early, not only truncated


def test_local_mixed_sampling_params(local):
    greedy = [req(p, max_tokens=8) for p in PROMPTS[:3]]
    sampled = [req(p, max_tokens=8, temperature=1.0, seed=7) for p in PROMPTS[:3]]
    mixed = [greedy[0], sampled[0], greedy[1], sampled[1], greedy[2], sampled[2]]
    out = local.complete(mixed)
    g_only = local.complete(greedy)
    s_only = local.complete(sampled)
    assert [c.text for c in out[0::2]] == [c.text for c in g_only]
    assert [c.text for c in out[1::2]] == [c.text for c in s_only]  # seeded: reproducible
    other_seed = local.complete([req(p, max_tokens=8, temperature=1.0, seed=8) for p in PROMPTS[:3]])
    assert [c.text for c in other_seed] != [c.text for c in s_only]


@pytest.mark.parametrize("engine", ["compact", "generate"])
def test_local_generation_error_is_per_batch(lively_model_dir, local, monkeypatch, engine):
    import middo_pipeline.core.llm.decode as decode

    backend = LocalBackend(str(lively_model_dir), device="cpu", batch_size=2, loaded=local.loaded, engine=engine)
    owner, name = (decode, "decode_batch") if engine == "compact" else (local.loaded.model, "generate")
    real = getattr(owner, name)
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, flaky)
    out = backend.complete([req(p, max_tokens=4) for p in PROMPTS[:4]])
    assert sum(1 for c in out if c.error and "boom" in c.error) == 2
    assert sum(1 for c in out if c.ok) == 2


def test_compact_engine_equals_generate(local, lively_model_dir):
    """Rows leaving the batch as they finish change nothing a caller sees: greedy texts, token
    counts and finish reasons are generate's, with and without stop strings, at every batch size."""
    reqs = [req(p, max_tokens=m) for p in PROMPTS for m in (3, 12)]
    stop = local.complete([req(PROMPTS[1], max_tokens=24)])[0].text[6:9]
    reqs += [req(p, max_tokens=24, stop=(stop,)) for p in PROMPTS]
    ref = LocalBackend(str(lively_model_dir), device="cpu", batch_size=4, loaded=local.loaded, engine="generate")
    want = ref.complete(reqs)

    def seen(c, with_count: bool):
        u = c.usage
        return c.text, u["finish_reason"], u["prompt_tokens"], u["completion_tokens"] if with_count else None

    for b in (1, 3, 8):
        fast = LocalBackend(str(lively_model_dir), device="cpu", batch_size=b, loaded=local.loaded)
        assert fast.engine == "compact"
        got = fast.complete(reqs)
        # generate keeps a row that met its stop string in the batch and counts the padding that
        # follows as generated tokens; compact counts what was generated (never more)
        for r, g, w in zip(reqs, got, want):
            assert seen(g, not r.stop) == seen(w, not r.stop)
            assert g.usage["completion_tokens"] <= w.usage["completion_tokens"]
    assert {c.usage["finish_reason"] for c in want} == {"stop", "length"}  # both kinds were compared


def test_decode_prompt_groups_slab_and_layout_change_no_text(local):
    """The prompt pass in length-sorted groups laid into one slab cache that grows past its first
    chunk, with column-major weights, gives the texts of one padded prompt pass with
    transformers' concatenating cache (``generate``), and leaves the model's weights as they were."""
    import torch

    from middo_pipeline.core.llm import decode

    lm = local.loaded
    tok = lm.tokenizer
    tok.padding_side = "left"
    texts = [local._prompt_text(tok, req(p)) for p in PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    n_new = decode.SLAB_CHUNK + 16  # the slab grows once
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    got = {
        rows: [
            d.tokens
            for d in decode.decode_batch(
                lm.model, enc["input_ids"], enc["attention_mask"], max_new_tokens=n_new, eos_ids=[], prefill_rows=rows
            )
        ]
        for rows in (1, 2, len(PROMPTS))
    }
    with torch.inference_mode():
        ref = lm.model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id)
    want = [row[enc["input_ids"].shape[1] :].tolist() for row in ref]
    assert all(len(t) == n_new for t in want)
    assert got[1] == got[2] == got[len(PROMPTS)] == want
    after = lm.model.state_dict()
    assert all(after[k].is_contiguous() and torch.equal(after[k], v) for k, v in before.items())


def test_slab_drops_rows_and_keeps_writing_in_place():
    """Dropping finished rows keeps the other rows' keys and values (in their new order), and the
    next step still writes into the slab without copying it."""
    import torch

    from middo_pipeline.core.llm.decode import _SlabLayer

    k, v = torch.randn(5, 2, 10, 4), torch.randn(5, 2, 10, 4)
    layer = _SlabLayer(k.clone(), v.clone(), 6)
    keep = torch.tensor([4, 0, 2])
    layer.batch_select_indices(keep)
    assert torch.equal(layer.keys, k[keep][:, :, :6]) and torch.equal(layer.values, v[keep][:, :, :6])
    slab = layer.kbuf.data_ptr()
    nk, nv = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    keys, values = layer.update(nk, nv)
    assert layer.kbuf.data_ptr() == slab and keys.shape == (3, 2, 7, 4)
    assert torch.equal(keys[:, :, 6:], nk) and torch.equal(values[:, :, :6], v[keep][:, :, :6])


def test_decode_other_cache_layers_get_one_prompt_pass(local, monkeypatch):
    """A model whose cache layers are not plain ``DynamicLayer`` s (sliding windows, linear
    attention) is read as one padded batch with its own cache: same texts, no slab."""
    from middo_pipeline.core.llm import decode

    lm = local.loaded
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok([local._prompt_text(tok, req(p)) for p in PROMPTS], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=12, eos_ids=[], prefill_rows=2)
    want = [d.tokens for d in decode.decode_batch(lm.model, enc["input_ids"], enc["attention_mask"], **kw)]
    slabs = []
    monkeypatch.setattr(decode, "_assemble", lambda *a: slabs.append(1) or (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(decode, "DynamicLayer", type("OtherLayer", (), {}))
    got = [d.tokens for d in decode.decode_batch(lm.model, enc["input_ids"], enc["attention_mask"], **kw)]
    assert got == want and not slabs


def test_column_major_restores_on_error(local):
    import torch

    from middo_pipeline.core.llm.decode import column_major

    model = local.loaded.model
    lin = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    w = lin.weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"), column_major(model):
        assert not lin.weight.is_contiguous() and lin.weight.t().is_contiguous()
        raise RuntimeError("boom")
    assert lin.weight.is_contiguous() and torch.equal(lin.weight, w)


def test_blocked_head_gives_bit_identical_logits_and_restores(local):
    """The output head multiplied in blocks of its rows gives the same logits bit for bit (so
    greedy texts cannot change), is left row-major by ``column_major``, and gets its own
    ``forward`` back afterwards, also on error."""
    import torch

    from middo_pipeline.core.llm.decode import _output_head, blocked_head, column_major

    model = local.loaded.model
    head = _output_head(model)
    assert head is not None and head.weight.shape[0] > 128
    hidden = torch.randn(5, 3, head.weight.shape[1])
    want = head(hidden)
    with blocked_head(model, block=128), column_major(model):
        assert "forward" in head.__dict__  # the blocked forward is installed
        assert head.weight.is_contiguous()  # the head stays row-major
        got = head(hidden)
    assert torch.equal(got, want)
    assert "forward" not in head.__dict__
    with pytest.raises(RuntimeError, match="boom"), blocked_head(model, block=128):
        raise RuntimeError("boom")
    assert "forward" not in head.__dict__ and torch.equal(head(hidden), want)


def test_compact_sampling_does_not_depend_on_the_batch(local):
    """Each sampling row draws from its own generator: a request's text is the same alone, with
    other requests, and with other seeds in its batch (the cache can then key it by itself)."""
    mine = req(PROMPTS[3], max_tokens=10, temperature=1.0, seed=5)
    alone = local.complete([mine])[0].text
    others = [
        req(p, max_tokens=m, temperature=t, seed=s)
        for p, m, t, s in zip(PROMPTS, (4, 12, 7), (1.0, 0.0, 0.7), (1, 2, 3))
    ]
    assert local.complete([*others, mine])[-1].text == alone
    assert local.complete([mine, *others[:1]])[0].text == alone
    assert local.complete([req(PROMPTS[3], max_tokens=10, temperature=1.0, seed=6)])[0].text != alone


def test_compact_engine_falls_back_to_generate(local, lively_model_dir, monkeypatch, caplog):
    import middo_pipeline.core.llm.decode as decode

    def unsupported(*a, **kw):
        raise decode.DecodeUnsupported("no droppable cache")

    monkeypatch.setattr(decode, "decode_batch", unsupported)
    backend = LocalBackend(str(lively_model_dir), device="cpu", batch_size=4, loaded=local.loaded)
    reqs = [req(p, max_tokens=6) for p in PROMPTS]
    with caplog.at_level("WARNING"):
        out = backend.complete(reqs)
    assert backend.engine == "generate" and "falls back" in caplog.text
    assert [c.text for c in out] == [c.text for c in local.complete(reqs)]
    with pytest.raises(ValueError, match="engine"):
        LocalBackend(engine="vllm")


def test_local_load_failure_is_unavailable(tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    with pytest.raises(BackendUnavailable, match="not-a-model"):
        LocalBackend(str(bad), device="cpu").complete([req("hi")])


def test_balanced_batches():
    from middo_pipeline.core.llm.local import _balanced

    assert [len(b) for b in _balanced(list(range(142)), 128)] == [71, 71]
    assert [len(b) for b in _balanced(list(range(142)), 64)] == [48, 47, 47]
    assert [len(b) for b in _balanced(list(range(5)), 8)] == [5]
    assert sum(_balanced(list(range(10)), 3), []) == list(range(10))  # order kept, nothing lost
    assert _balanced([], 4) == []


def test_truncate_at_stop():
    assert truncate_at_stop("abc END def STOP", ("STOP", "END")) == "abc "
    assert truncate_at_stop("abc", ()) == "abc"
    assert truncate_at_stop("abc", ("",)) == "abc"


# ---------------------------------------------------------------------------------------------
# OpenAIBackend against a real HTTP server
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def secret(monkeypatch):
    value = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, value)
    return value


def backend_for(fake, **kw) -> OpenAIBackend:
    kw.setdefault("api_key_env", KEY_ENV)
    kw.setdefault("timeout", 5.0)
    kw.setdefault("max_retries", 2)
    return OpenAIBackend(kw.pop("base_url", fake.url), kw.pop("model", "test-model"), **kw)


def test_openai_success_order_usage_and_key_sent(fake, secret):
    b = backend_for(fake, max_concurrency=4)
    reqs = [req(f"question {i}", max_tokens=16, temperature=0.3, seed=5) for i in range(10)]
    progress = []
    out = b.complete(reqs, progress=lambda d, t: progress.append((d, t)))
    assert [c.text for c in out] == [f"echo: question {i}" for i in range(10)]
    assert all(
        c.ok and not c.cached and c.usage == {"prompt_tokens": 7, "completion_tokens": 3, "finish_reason": "stop"}
        for c in out
    )
    assert progress[-1] == (10, 10) and len(progress) == 10
    assert b.backend_id == f"openai:{fake.url}:test-model"
    calls = fake.chat_calls
    assert len(calls) == 10
    assert all(c.headers.get("authorization") == f"Bearer {secret}" for c in fake.calls)
    body = calls[0].body
    assert body["model"] == "test-model" and body["max_tokens"] == 16
    assert body["temperature"] == 0.3 and body["seed"] == 5
    assert b.stats()["retries"] == 0 and b.stats()["errors"] == 0


def test_openai_prefill_stop_and_extra_body(fake, secret):
    def reply(body, n):
        assert body["messages"][-1]["content"].endswith('Begin your answer with "Final prompt:".')
        return chat_ok("Final prompt: Do X. END and more")

    fake.chat = reply
    b = backend_for(fake, extra_body={"top_k": 20})
    out = b.complete([req("rewrite this", prefill="Final prompt:", stop=("END",))])[0]
    assert out.text == " Do X. "
    assert fake.chat_calls[0].body["stop"] == ["END"]
    assert fake.chat_calls[0].body["top_k"] == 20
    # a reply that does not repeat the prefill is kept whole
    fake.chat = lambda body, n: chat_ok("Do Y.")
    assert b.complete([req("again", prefill="Final prompt:")])[0].text == "Do Y."


def test_openai_bounded_concurrency(fake, secret):
    fake.chat = lambda body, n: Reply(**{**chat_ok("ok").__dict__, "delay": 0.15})
    b = backend_for(fake, max_concurrency=3)
    t0 = time.monotonic()
    out = b.complete([req(f"q{i}") for i in range(9)])
    assert all(c.ok for c in out)
    assert 2 <= fake.max_in_flight <= 3
    assert time.monotonic() - t0 < 9 * 0.15  # it did run in parallel


def test_openai_429_then_success_is_retried(fake, secret):
    fake.chat = lambda body, n: error(429, "slow down") if n == 0 else chat_ok("finally")
    b = backend_for(fake, max_retries=2)
    out = b.complete([req("q")])
    assert out[0].ok and out[0].text == "finally"
    assert len(fake.chat_calls) == 2
    assert b.stats()["retries"] == 1


def test_openai_429_always(fake, secret):
    fake.chat = lambda body, n: error(429, "slow down")
    b = backend_for(fake, max_retries=2)
    out = b.complete([req("q")])
    assert out[0].error == "rate limited (429) after 2 retries"
    assert len(fake.chat_calls) == 3


def test_openai_500_until_failure(fake, secret):
    fake.chat = lambda body, n: error(500, "internal")
    b = backend_for(fake, max_retries=3)
    out = b.complete([req("a"), req("b")])
    assert all(c.error == "http 500 after 3 retries" and c.text is None for c in out)
    assert len(fake.chat_calls) == 2 * (3 + 1)
    assert b.stats() == {"requests": 2, "attempts": 1 + 8, "retries": 6, "errors": 2}  # 1 = GET /models


def test_openai_400_is_not_retried(fake, secret):
    fake.chat = lambda body, n: error(400, "context length exceeded")
    out = backend_for(fake).complete([req("a")])
    assert out[0].error == "http 400: context length exceeded"
    assert len(fake.chat_calls) == 1


@pytest.mark.parametrize(
    "reply",
    [
        Reply(200, b"{not json"),
        Reply(200, {"id": "x", "object": "chat.completion"}),  # no choices
        Reply(200, {"choices": []}),
        Reply(200, {"choices": [{"index": 0, "message": {"role": "assistant"}}]}),  # no content
        Reply(200, b"<html>oops</html>", content_type="text/html"),
    ],
    ids=["bad-json", "no-choices", "empty-choices", "no-content", "html"],
)
def test_openai_malformed_response(fake, secret, reply):
    fake.chat = lambda body, n: reply if n == 0 else chat_ok("fine")
    b = backend_for(fake, max_concurrency=1)
    out = b.complete([req("a"), req("b")])
    assert out[0].error == "malformed response"
    assert out[1].ok and out[1].text == "fine"


def test_openai_timeout(fake, secret):
    fake.chat = lambda body, n: Reply(**{**chat_ok("late").__dict__, "delay": 1.5})
    b = backend_for(fake, timeout=0.3, max_retries=1)
    t0 = time.monotonic()
    out = b.complete([req("slow")])
    assert out[0].error is not None and out[0].error.startswith("timeout")
    assert "after 1 retries" in out[0].error
    assert len(fake.chat_calls) == 2
    assert time.monotonic() - t0 < 1.5 + 1.0


def test_openai_401_is_unavailable_at_check(fake, secret):
    fake.models_status = 401
    b = backend_for(fake)
    with pytest.raises(BackendUnavailable) as info:
        b.check()
    msg = str(info.value)
    assert fake.url in msg and KEY_ENV in msg and "401" in msg
    with pytest.raises(BackendUnavailable):
        b.complete([req("a")])
    assert fake.chat_calls == []


def test_openai_401_on_chat_only(fake, secret):
    """/models open but chat needs a key (some proxies): the probe completion catches it."""
    fake.models = ["other"]
    fake.chat = lambda body, n: error(401, "bad key")
    with pytest.raises(BackendUnavailable, match="401"):
        backend_for(fake).check()


def test_openai_key_revoked_mid_batch(fake, secret):
    fake.chat = lambda body, n: chat_ok("ok") if n < 2 else error(403, "revoked")
    b = backend_for(fake, max_concurrency=1)
    seen = []
    with pytest.raises(BackendUnavailable, match="403"):
        b.complete([req(f"q{i}") for i in range(6)], on_result=lambda i, c: seen.append((i, c.ok)))
    assert [ok for _, ok in seen[:2]] == [True, True]
    assert len(fake.chat_calls) <= 4  # the rest was cancelled, not sent


def test_openai_wrong_path_404(fake, secret):
    b = backend_for(fake, base_url=f"http://127.0.0.1:{fake.port}/wrong")
    with pytest.raises(BackendUnavailable) as info:
        b.complete([req("a")])
    msg = str(info.value)
    assert f"http://127.0.0.1:{fake.port}/wrong" in msg and "/v1" in msg and "404" in msg


def test_openai_model_not_found(fake, secret):
    fake.models = ["served-model"]
    fake.chat = lambda body, n: error(404, f"The model `{body['model']}` does not exist", "model_not_found")
    with pytest.raises(BackendUnavailable) as info:
        backend_for(fake, model="missing-model").check()
    msg = str(info.value)
    assert "missing-model" in msg and "served-model" in msg


def test_openai_models_not_served_falls_back_to_completion(fake, secret):
    fake.models_status = 404  # e.g. a minimal server without GET /models
    b = backend_for(fake)
    b.check()
    assert len(fake.chat_calls) == 1 and fake.chat_calls[0].body["max_tokens"] == 1
    assert b.complete([req("a")])[0].text == "echo: a"


def test_openai_connection_refused(secret):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    b = OpenAIBackend(url, "test-model", api_key_env=KEY_ENV, max_retries=4, timeout=2.0)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        b.complete([req("a")])
    assert url in str(info.value) and "running" in str(info.value)
    assert time.monotonic() - t0 < 5


def test_openai_missing_key_uses_placeholder(fake, monkeypatch, caplog):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="middo_pipeline"):
        b = backend_for(fake)
    assert any(KEY_ENV in r.getMessage() and "EMPTY" in r.getMessage() for r in caplog.records)
    assert b.complete([req("a")])[0].ok
    assert fake.chat_calls[0].headers["authorization"] == "Bearer EMPTY"
    assert "placeholder" in repr(b)


def _chain(exc: BaseException | None):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def test_openai_key_never_leaks(fake, secret, caplog):
    texts: list[str] = []
    for name in ("", "openai", "httpx2", "httpcore2", "middo_pipeline"):
        caplog.set_level(logging.DEBUG, logger=name or None)

    b = backend_for(fake, max_retries=1)
    texts += [repr(b), str(b), b.backend_id]
    fake.chat = lambda body, n: chat_ok("ok") if n % 2 == 0 else error(500, f"server echoes {body['model']}")
    texts += [str(c.error) for c in b.complete([req("a"), req("b"), req("c")])]
    fake.chat = lambda body, n: error(400, "bad request")
    texts += [str(c.error) for c in b.complete([req("d")])]
    # a server that echoes the Authorization header in its error message: masked
    fake.chat = lambda body, n: error(400, "you sent " + fake.calls[-1].headers["authorization"])
    echoed = b.complete([req("d2")])[0].error
    assert echoed == "http 400: you sent Bearer ***"
    texts.append(echoed)
    fake.chat = lambda body, n: Reply(**{**chat_ok("late").__dict__, "delay": 0.6})
    texts += [str(c.error) for c in backend_for(fake, timeout=0.2, max_retries=0).complete([req("e")])]

    failing = []
    fake.models_status = 401
    failing.append(lambda: backend_for(fake).complete([req("x")]))
    failing.append(lambda: backend_for(fake, base_url=f"http://127.0.0.1:{fake.port}/wrong").check())
    failing.append(
        lambda: OpenAIBackend(f"http://127.0.0.1:{closed_port()}/v1", "m", api_key_env=KEY_ENV, max_retries=0).check()
    )
    for fn in failing:
        with pytest.raises(BackendUnavailable) as info:
            fn()
        for e in _chain(info.value):
            texts += [str(e), repr(e), str(e.args)]
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(b)

    for r in caplog.records:
        texts += [r.getMessage(), str(r.args), str(r.msg), str(r.exc_text or "")]
    texts.append(caplog.text)
    assert len(caplog.records) > 10  # DEBUG logging was on
    assert any(c.headers.get("authorization") == f"Bearer {secret}" for c in fake.calls)  # it was used
    leaks = [t for t in texts if secret in t]
    assert not leaks, leaks[:3]


def test_make_backend(fake, secret, lively_model_dir, tmp_path):
    b = make_backend("openai", base_url=fake.url, model="test-model", api_key_env=KEY_ENV)
    assert isinstance(b, OpenAIBackend)
    local = make_backend("local", model=str(lively_model_dir), device="cpu", batch_size=2)
    assert isinstance(local, LocalBackend) and local.batch_size == 2
    cached = make_backend(
        "openai", cache=tmp_path / "c.sqlite", base_url=fake.url, model="test-model", api_key_env=KEY_ENV
    )
    assert cached.backend_id == b.backend_id
    assert cached.complete([req("z")])[0].text == "echo: z"
    with pytest.raises(ValueError, match="unknown"):
        make_backend("vllm")


def test_local_reports_text_cut_at_the_token_limit(local):
    cut = local.complete([req(PROMPTS[1], max_tokens=4)])[0]
    assert cut.usage["completion_tokens"] == 4 and cut.usage["finish_reason"] == "length" and cut.truncated
    full = local.complete([req(PROMPTS[1], max_tokens=24)])[0]
    stop = full.text[6:9]
    stopped = local.complete([req(PROMPTS[1], max_tokens=24, stop=(stop,))])[0]
    assert stopped.usage["finish_reason"] == "stop" and not stopped.truncated
