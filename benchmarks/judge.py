"""Quality judge: expected score from next-token probabilities (ours) against generate-then-parse
(the reference's way), on the same samples and the same model.

*Ours*: ``quality.expected_scores`` as the ``quality_signals`` asset calls it (6 judgements
per sample, each one forward pass that reads the probabilities of the score tokens), then
``combine_scores``.

*The reference's way* (``quality_*_dataset.py`` + ``quality_infer.py`` + ``quality_filter.py``
of Word2VecT/Middo): for each of the three dimensions, once on the prompt alone and once on
prompt + response, ask the model for a 0-10 rating *number first, then an explanation*,
generate, take the first number in the text (clamped to 0..10; none found scores 0), average
the two judgements per dimension and the three dimensions. To compare scoring methods and not
wordings, the question is the pipeline's own (``quality.judge_messages``) with its last line
("reply with a single integer") replaced by the reference's ending (number first, then an
explanation), and no "Score: " prefill. Generation is greedy and batched (``LocalBackend``,
``judge_batch_size`` at a time with left padding; the reference batches with vLLM) and capped
at ``judge_max_new_tokens`` new tokens; the reference allows 1024, so on a CPU the cap makes
generate-then-parse *cheaper* than the reference's and the speed-up a lower bound.

Reported: seconds per sample (all 6 judgements) both ways, the ratio, and the Spearman rank
correlation of the two final scores (also with unparseable judgements treated as missing
rather than 0).
"""

from __future__ import annotations

import re
import time

import numpy as np

from benchmarks.common import load_seed_rows, log, prompts_responses

_NUMBER = re.compile(r"\d+\.\d+|\d+")  # the reference's pattern
REFERENCE_ASK = "Give your rating as a number from 0 to 10 first (avoid a full 10), then explain why you gave it."


def reference_request(prompt: str, response: str | None, dim: str, max_tokens: int):
    """The pipeline's own judge question for (dimension, view), with the reference's ending:
    no "Score: " prefill, and the rating number first *followed by an explanation*."""
    from middo_pipeline.core import quality
    from middo_pipeline.core.llm.protocol import ChatRequest

    messages = quality.judge_messages(dim, prompt, response)
    content = messages[-1]["content"].replace(" Reply with the number only.", "")  # the pipeline's own ask
    lines = content.split("\n")
    if lines and "integer" in lines[-1].lower():  # the pipeline's "reply with a single integer" line
        lines[-1] = REFERENCE_ASK
    else:
        lines.append(REFERENCE_ASK)
    messages[-1] = {**messages[-1], "content": "\n".join(lines)}
    return ChatRequest.from_messages(messages, max_tokens=max_tokens, temperature=0.0)


def first_number(text: str | None) -> float | None:
    """The reference's parse: the first number in the text, clamped to 0..10 (None: no number)."""
    if not text:
        return None
    m = _NUMBER.search(text)
    if not m:
        return None
    return float(min(max(float(m.group(0)), 0.0), 10.0))


def generate_then_parse(lm, prompts, responses, max_new_tokens: int, batch_size: int) -> dict:
    from middo_pipeline.core.llm.local import LocalBackend
    from middo_pipeline.core.quality import DIMENSIONS, combine_scores

    backend = LocalBackend(loaded=lm, batch_size=batch_size)
    reqs, where = [], []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        for j, d in enumerate(DIMENSIONS):
            reqs.append(reference_request(p, None, d, max_new_tokens))
            where.append((i, j))
            reqs.append(reference_request(p, r, d, max_new_tokens))
            where.append((i, 3 + j))
    t0 = time.perf_counter()
    comps = backend.complete(reqs)
    seconds = time.perf_counter() - t0
    raw = np.full((len(prompts), 6), np.nan)
    gen_tokens = hit_cap = 0
    texts = []
    for (i, j), c in zip(where, comps):
        v = first_number(c.text if c.ok else None)
        raw[i, j] = np.nan if v is None else v
        used = int((c.usage or {}).get("completion_tokens", 0))
        gen_tokens += used
        hit_cap += used >= max_new_tokens
        texts.append(c.text if c.ok else None)
    zero = np.nan_to_num(raw, nan=0.0)  # the reference scores an unparseable judgement 0
    per_dim_ref = (zero[:, :3] + zero[:, 3:]) / 2
    score_ref = per_dim_ref.mean(axis=1)
    score_nan = np.asarray(combine_scores(raw)["quality_score"], dtype=np.float64)  # NaN only if all 6 failed
    return {
        "seconds": seconds,
        "scores_zero_for_missing": score_ref,
        "scores_missing_as_nan": score_nan,
        "parsed_fraction": float(np.isfinite(raw).mean()),
        "generated_tokens": gen_tokens,
        "hit_cap_fraction": hit_cap / max(len(comps), 1),
        "examples": texts[:6],
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    return float(spearmanr(a[ok], b[ok]).statistic)


def compare(lm, prompts, responses, settings) -> tuple[dict, np.ndarray]:
    """Both ways on the same samples and model: (the judge block, our (N, 6) expected scores)."""
    from middo_pipeline.core import quality

    n = len(prompts)
    quality.expected_scores(lm.model, lm.tokenizer, prompts[:1], responses[:1], max_length=512)  # warm-up
    t_exp_runs = []

    def expected():
        t0 = time.perf_counter()
        r = quality.expected_scores(lm.model, lm.tokenizer, prompts, responses, max_length=512)
        t_exp_runs.append(time.perf_counter() - t0)
        return r

    # expected scores timed before and after the (long) generation, best of the two: on a shared
    # machine the load changes over minutes
    s6 = expected()
    ours = np.asarray(quality.combine_scores(s6)["quality_score"], dtype=np.float64)
    log(f"judge: expected scores {t_exp_runs[0]:.1f}s ({t_exp_runs[0] / n:.3f} s/sample)")

    log(f"judge: generate-then-parse, {6 * n} generations of up to {settings.judge_max_new_tokens} tokens")
    gen = generate_then_parse(lm, prompts, responses, settings.judge_max_new_tokens, settings.judge_batch_size)
    log(
        f"judge: generate {gen['seconds']:.1f}s ({gen['seconds'] / n:.3f} s/sample), "
        f"parsed {100 * gen['parsed_fraction']:.0f}%"
    )
    # the pipeline's own generate mode (quality_signals mode=generate): a "Score: " prefill and
    # a few tokens, parsed; unparseable = missing. It asks the model the same question as the
    # expected score, only sampling the answer instead of reading its distribution
    from middo_pipeline.core.llm.local import LocalBackend

    t0 = time.perf_counter()
    short6 = quality.generated_scores(LocalBackend(loaded=lm, batch_size=settings.judge_batch_size), prompts, responses)
    t_short = time.perf_counter() - t0
    short = np.asarray(quality.combine_scores(short6)["quality_score"], dtype=np.float64)
    log(f"judge: number-only generation {t_short:.1f}s, parsed {100 * np.isfinite(short6).mean():.0f}%")
    expected()
    t_exp = min(t_exp_runs)
    log(f"judge: expected scores again {t_exp_runs[1]:.1f}s; using the best, {t_exp:.1f}s")
    block = {
        "samples": n,
        "judgements_per_sample": 6,
        "max_new_tokens": settings.judge_max_new_tokens,
        "reference_max_new_tokens": 1024,
        "batch_size": settings.judge_batch_size,
        "expected": {
            "seconds": t_exp,
            "seconds_per_sample": t_exp / n,
            "runs_s": t_exp_runs,
            "missing_judgements": int(np.isnan(np.asarray(s6, dtype=np.float64)).sum()),
            "score_mean": float(np.nanmean(ours)),
            "score_std": float(np.nanstd(ours)),
        },
        "generate": {
            "seconds": gen["seconds"],
            "seconds_per_sample": gen["seconds"] / n,
            "parsed_fraction": gen["parsed_fraction"],
            "generated_tokens": gen["generated_tokens"],
            "mean_generated_tokens": gen["generated_tokens"] / max(6 * n, 1),
            "hit_token_cap_fraction": gen["hit_cap_fraction"],
            "score_mean": float(np.nanmean(gen["scores_zero_for_missing"])),
            "score_std": float(np.nanstd(gen["scores_zero_for_missing"])),
            "examples": gen["examples"],
        },
        "generate_number_only": {
            "seconds": t_short,
            "seconds_per_sample": t_short / n,
            "parsed_fraction": float(np.isfinite(short6).mean()),
            "how": "the pipeline's mode=generate: 'Score: ' prefill, up to 8 new tokens",
        },
        "spearman_vs_generate_number_only": _spearman(ours, short),
        "speedup_vs_generate": gen["seconds"] / t_exp,
        "spearman_vs_generate": _spearman(ours, gen["scores_zero_for_missing"]),
        "spearman_vs_generate_missing_as_nan": _spearman(ours, gen["scores_missing_as_nan"]),
        "scores": {"expected": ours, "generated": gen["scores_zero_for_missing"], "generated_number_only": short},
    }
    return block, s6


def run(settings, models) -> dict:
    """Standalone (``--only judge``): the base model judges seed samples. In a whole run the
    comparison happens inside the detection section instead, on the controlled set and the
    trained checkpoint (the self-judge the pipeline uses), so the expected scores are not
    computed twice."""
    lm = models.get()
    rows = load_seed_rows()
    n = min(settings.judge_samples, len(rows))
    step = max(len(rows) // n, 1)
    prompts, responses = prompts_responses(rows[1::step][:n])
    block, _ = compare(lm, prompts, responses, settings)
    block["model"] = "base (default model, untrained)"
    block["samples_from"] = "seed data"
    return block
