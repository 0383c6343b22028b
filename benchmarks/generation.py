"""Optimizer generation: the same requests through the local backend's paths, side by side.

The requests are what a round sends: built with the optimizer's own prompt builders
(``operation_request`` for simplify / rewrite / extend in the local default style,
``response_request`` for the response step) from the seed samples, at the pipeline's token
limits (160 new tokens for a prompt step, 192 for a response), greedy (temperature 0) so that
the paths' texts can be compared.

Paths (all in one process, on one loaded model, in one run, alternated per repeat):

- ``transformers_generate``: ``LocalBackend`` as it was before this section (transformers'
  ``generate`` on static batches of 8, sorted by prompt length): the baseline;
- ``batch_N``: the same with larger static batches (still sorted by length);
- ``compact_batch_N``: the backend's default engine (``core/llm/decode.py``): the same
  batches, but a row that has finished leaves the batch and the KV cache before the next
  step, and the prompt pass computes the last position's logits only;
- ``int8_batch_N``: the backend's ``quantize=int8`` (``core.llm.local.quantize_int8``: the
  Linear layers dynamically quantized to int8, per-channel weights, except the MLP's output
  projection and the head; CPU only) at batch N. int8 is another model, so beside its speed
  the section reports what it costs (``int8_quality``): the held-out response loss of the base
  model in fp32, with the pipeline's int8 scheme and with every Linear layer int8 (torch's
  default), paired per item;
- ``continuous_batching``: transformers' ``generate_batch`` (paged attention, requests join and
  leave the batch as they finish), greedy, without stop strings or repetition penalty (it
  takes neither per request), so its texts differ from the others by construction.

Per path: generated tokens/s, seconds per request, the fraction of the machine's bound
(fp32 matmul FLOP/s from the hardware section / (2 x parameters) tokens/s; large matrices),
and beside it, for the default path, the bound of its own decoding steps
(``decode_matmul_bound``: the model's linear layers alone at the mean number of live rows), and agreement
with the baseline's texts (identical strings). Static batches pad on the left: a row's
logits depend (by float rounding) on its batch's padding width, so even two fp32 batch
sizes may disagree on a few greedy texts; the fraction says how many.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

from benchmarks.common import load_seed_rows, log, n_params

BASELINE = "transformers_generate"
HELDOUT = Path(__file__).resolve().parents[1] / "data" / "eval_heldout.jsonl"


def build_requests(n: int, rows: list[dict] | None = None) -> list:
    """``n`` optimizer requests from the seed: half prompt steps (simplify / rewrite / extend in
    turn), half response steps, at the pipeline's default token limits, greedy."""
    from middo_pipeline.core.optimizer.prompts import PromptConfig, operation_request, response_request
    from middo_pipeline.core.schema import EXTENDED, REWRITTEN, SIMPLIFIED, prompt_text

    rows = rows or load_seed_rows()
    cfg = PromptConfig()  # direct style, 160 / 192 new tokens, temperature 0
    ops = (SIMPLIFIED, REWRITTEN, EXTENDED)
    reqs = []
    for i in range(n):
        s = rows[i % len(rows)]
        p = prompt_text(s["instruction"], s.get("input", ""))
        if i % 2 == 0:
            op = ops[(i // 2) % 3]
            hints = []
            if op == EXTENDED:
                hints = [prompt_text(rows[(i + j) % len(rows)]["instruction"], "") for j in (1, 2, 3)]
            reqs.append(operation_request(op, p, cfg, hints))
        else:
            reqs.append(response_request(s["instruction"], cfg))
    return reqs


def _continuous(lm, backend, requests) -> list:
    """transformers' continuous batching (``generate_batch``), greedy."""
    from transformers import GenerationConfig

    from middo_pipeline.core.llm.protocol import Completion

    tok = lm.tokenizer
    ids = [list(tok(backend._prompt_text(tok, r), add_special_tokens=False)["input_ids"]) for r in requests]
    eos = backend._eos_ids(lm)
    gc = GenerationConfig(
        max_new_tokens=max(r.max_tokens for r in requests),
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos[0],
    )
    out = lm.model.generate_batch(ids, generation_config=gc, progress_bar=False)
    res = []
    for i, (_rid, o) in enumerate(sorted(out.items(), key=lambda kv: int(str(kv[0]).rsplit("_", 1)[-1]))):
        new = list(o.generated_tokens)[: requests[i].max_tokens]
        new = [t for t in new if t not in eos]
        res.append(Completion(text=tok.decode(new, skip_special_tokens=True), usage={"completion_tokens": len(new)}))
    return res


def run(settings, models, hardware: dict | None = None) -> dict:
    from middo_pipeline.core.llm.local import LocalBackend, quantize_int8

    lm = models.get()
    n = settings.gen_requests
    requests = build_requests(n)
    params = n_params(lm.model)
    bound_tok_s = None
    if hardware and "fp32" in hardware:
        bound_tok_s = hardware["fp32"]["flops"] / (2.0 * params)

    paths: dict[str, callable] = {}
    base = LocalBackend(batch_size=8, loaded=lm, engine="generate")
    paths[BASELINE] = lambda: base.complete(requests)
    for b in settings.gen_batch_sizes:
        be = LocalBackend(batch_size=b, loaded=lm, engine="generate")
        paths[f"batch_{b}"] = lambda be=be: be.complete(requests)
    for b in settings.gen_compact_batch_sizes:
        be = LocalBackend(batch_size=b, loaded=lm, engine="compact")
        paths[be.path_name] = lambda be=be: be.complete(requests)
    if lm.device.type == "cpu" and settings.gen_int8:
        qlm = copy.copy(lm)
        qlm.model = quantize_int8(copy.deepcopy(lm.model))
        for b in settings.gen_int8_batch_sizes:
            be = LocalBackend(batch_size=b, loaded=qlm)
            paths[f"int8_batch_{b}"] = lambda be=be: be.complete(requests)
    if settings.gen_continuous and hasattr(lm.model, "generate_batch"):
        paths["continuous_batching"] = lambda: _continuous(lm, base, requests)

    runs: dict[str, list[dict]] = {k: [] for k in paths}
    texts: dict[str, list] = {}
    usage: dict[str, list[int]] = {}  # completion tokens per request (first run of each path)
    for rep in range(settings.gen_repeats):
        for name, fn in paths.items():
            log(f"generation: {name}, repeat {rep + 1}/{settings.gen_repeats}, {n} requests")
            t0 = time.perf_counter()
            try:
                out = fn()
            except Exception as exc:  # one path failing must not lose the others
                runs[name].append({"error": f"{type(exc).__name__}: {exc}"[:300]})
                log(f"generation: {name} failed: {exc}")
                continue
            dt = time.perf_counter() - t0
            per_request = [int(c.usage.get("completion_tokens") or 0) if c.ok else 0 for c in out]
            toks = sum(per_request)
            runs[name].append({"seconds": dt, "tokens": toks, "errors": sum(not c.ok for c in out), "tok_s": toks / dt})
            texts.setdefault(name, [c.text for c in out])
            usage.setdefault(name, per_request)
            log(f"generation: {name}: {dt:.1f}s, {toks} tokens, {toks / dt:.1f} tok/s")

    out: dict = {
        "requests": n,
        "repeats": settings.gen_repeats,
        "params": params,
        "bound_tokens_per_s": bound_tok_s,
        "paths": {},
    }
    ref = texts.get(BASELINE)
    for name, rs in runs.items():
        good = [r for r in rs if "seconds" in r]
        if not good:
            out["paths"][name] = {"error": rs[0]["error"] if rs else "not run"}
            continue
        tok_s = statistics.median(r["tok_s"] for r in good)
        sec = statistics.median(r["seconds"] for r in good)
        agree = None
        if ref is not None and name in texts:
            agree = sum(a == b for a, b in zip(ref, texts[name])) / len(ref)
        out["paths"][name] = {
            "tokens_per_s": tok_s,
            "seconds_per_request": sec / n,
            "tokens": statistics.median(r["tokens"] for r in good),
            "errors": good[0]["errors"],
            "runs_tokens_per_s": [r["tok_s"] for r in good],
            "fraction_of_bound": tok_s / bound_tok_s if bound_tok_s else None,
            "agreement_with_baseline": agree,
        }
    base_tok = (out["paths"].get(BASELINE) or {}).get("tokens_per_s")
    for p in out["paths"].values():
        if base_tok and "tokens_per_s" in p:
            p["speedup"] = p["tokens_per_s"] / base_tok
    default = LocalBackend(loaded=lm)  # the backend's defaults: what a round uses
    name = default.path_name
    if name not in out["paths"] and default.engine == "compact" and default.batch_size >= n:
        # every request fits one batch at the default size: the same run as the smallest
        # measured compact batch that holds them all
        same = sorted(b for b in settings.gen_compact_batch_sizes if b >= n)
        if same:
            name = f"compact_batch_{same[0]}"
            out["default_path_measured_as"] = name
    out["default_path"] = default.path_name
    chosen = out["paths"].get(name) or {}
    out["speedup_vs_transformers_generate"] = chosen.get("speedup")
    out["default_agreement_with_baseline"] = chosen.get("agreement_with_baseline")
    best = max(
        (k for k, p in out["paths"].items() if "speedup" in p), key=lambda k: out["paths"][k]["speedup"], default=None
    )
    out["fastest_path"] = best
    if lm.device.type == "cpu" and settings.gen_int8 and settings.gen_int8_quality:
        out["int8_quality"] = int8_quality(lm, qlm.model)
    tokens = usage.get(name)
    if tokens and default.engine == "compact" and n <= default.batch_size:
        # one batch: a decoding step per token of its longest answer; rows leave as they finish
        rows = sum(tokens) / max(max(tokens), 1)
        out["decode_matmul_bound"] = decode_matmul_bound(lm.model, rows)
        bound = out["decode_matmul_bound"]["tokens_per_s"]
        out["default_fraction_of_decode_matmul_bound"] = chosen.get("tokens_per_s", 0.0) / bound if bound else None
    return out


def decode_matmul_bound(model, mean_rows: float, repeats: int = 5) -> dict:
    """What the linear layers alone allow while decoding: every ``nn.Linear`` of the model
    applied once to ``round(mean_rows)`` rows (one decoding step at the compact engine's mean
    number of live rows), with the weights laid out as the engine has them (``column_major``,
    ``blocked_head``), best of ``repeats``. Attention, norms, sampling and the prompt pass
    come on top, so a path can reach only part of it; the fp32 peak bound assumes large
    matrices, which a decoding step of a few rows does not have."""
    import torch

    from middo_pipeline.core.llm.decode import blocked_head, column_major

    rows = max(1, round(mean_rows))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    on_cpu = next(model.parameters()).device.type == "cpu"
    with torch.inference_mode(), blocked_head(model, enabled=on_cpu), column_major(model, enabled=on_cpu):
        xs = {
            m.in_features: torch.randn(rows, 1, m.in_features, dtype=m.weight.dtype, device=m.weight.device)
            for m in linears
        }
        best = float("inf")
        for _ in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            for m in linears:
                m(xs[m.in_features])
            best = min(best, time.perf_counter() - t0)
    return {
        "rows": rows,
        "mean_live_rows": mean_rows,
        "linear_layers": len(linears),
        "step_seconds": best,
        "tokens_per_s": rows / best,
    }


def int8_quality(lm, int8_model, eval_path: Path = HELDOUT) -> dict:
    """What int8 costs: the held-out response loss and MC accuracy of the base model in fp32,
    with the pipeline's int8 scheme (``int8_model``) and with every Linear layer int8 (torch's
    default ``quantize_dynamic``, the scheme before 2026-12-05); each int8 model minus fp32,
    paired per item, 95% bootstrap interval (loss > 0: worse)."""
    import torch

    from middo_pipeline.core.evaluation import evaluate, load_eval_set, paired_difference

    df = load_eval_set(eval_path)
    every = torch.ao.quantization.quantize_dynamic(copy.deepcopy(lm.model), {torch.nn.Linear}, dtype=torch.qint8)
    res = {}
    for name, model in (("fp32", lm.model), ("int8", int8_model), ("int8_every_linear", every)):
        t0 = time.perf_counter()
        res[name] = evaluate(model, lm.tokenizer, df, max_length=384)
        log(
            f"generation: held-out {name}: response loss {res[name]['mean_response_loss']:.3f}, "
            f"MC {res[name]['mc_accuracy']:.3f} ({time.perf_counter() - t0:.0f}s)"
        )
    ref = res["fp32"]["items"]
    out: dict = {"eval_set": eval_path.name, "items": int(ref.height)}
    for name, r in res.items():
        out[name] = {"mean_response_loss": float(r["mean_response_loss"]), "mc_accuracy": float(r["mc_accuracy"])}
        if name != "fp32":
            items = r["items"]
            out[name]["loss_minus_fp32"] = paired_difference(items["loss"].to_numpy(), ref["loss"].to_numpy())
            out[name]["mc_minus_fp32"] = paired_difference(
                items["correct"].cast(float).to_numpy(), ref["correct"].cast(float).to_numpy()
            )
            out[name]["same_choice_as_fp32"] = float((items["chosen"] == ref["chosen"]).mean())
    return out
