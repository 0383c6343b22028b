"""Downstream: is one round of Middo data better to train on than the seed, and what is the
verification gate worth? Every variant is built from the SAME candidates.

1. One Middo round runs for real through the Dagster loop (``loop.run_rounds``) in a
   throw-away instance, default model, local optimizer, verified refinement on
   (``down_candidates`` candidates per flagged sample). Its ``refinement_candidates`` table
   holds every candidate with its re-scored signals and whether it passed the gate.
2. Datasets, each merged from the seed with ``merge.merge_round`` (size policy ``keep``):
   ``seed`` (no refinement), ``gate_on`` (the pipeline: the best passing candidate),
   ``gate_off`` (the first candidate of every operation, accepted unverified: what trusting
   the optimizer gives), the gate-on refinements of ONE operation each
   (``simplify_only``, ``rewrite_only``, ``extend_only``), and a placebo, ``seed_reshuffled``
   (the seed's rows in another order: any change of the data reshuffles the training order,
   so its difference from the seed is the comparison's resolution).
3. For each training seed: a LoRA fine-tune of the base model on every dataset for one epoch
   (equal epochs, as the paper), and for ``down_equal_steps`` variants also for exactly the
   seed data's number of steps (equal compute); then ``evaluation.evaluate`` on the held-out
   set (``data/eval_large.jsonl``: 240 items written for the project): multiple-choice
   accuracy by log-likelihood and the mean response loss of the reference answers. Two
   measures, because at this scale they can disagree.
4. Paired comparisons with the seed: per item, the variant's correctness (and loss) averaged
   over seeds minus the seed data's; mean and a 95% bootstrap interval over items (the items
   are the unit of the test: the same items, the same seeds, only the data differ). That
   interval leaves out the run-to-run spread (the placebo measured it: another order of the
   same rows alone is "significant" there), so every comparison also carries a second interval,
   ``*_runs_items``, that resamples the runs of each side as well as the items.

With the 135M default on a CPU this is a small-scale check, not the paper's 8-benchmark gains.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, SEED_PATH, log
from middo_pipeline.constants import DEFAULT_MODEL
from middo_pipeline.core.verify import CANDIDATE_SIGNAL_COLUMNS

DOWN_EVAL = Path(os.environ.get("MIDDO_BENCH_DOWN_EVAL") or REPO / "data" / "eval_large.jsonl")
# the pipeline's default held-out set (round_evaluation): its items are among DOWN_EVAL's
PIPELINE_EVAL = REPO / "data" / "eval_heldout.jsonl"
VARIANTS = ("seed", "gate_on", "gate_off", "seed_reshuffled", "simplify_only", "rewrite_only", "extend_only")
PLACEBO_SEED = 12345
# what the gate adds to a candidate row (dropped before re-gating): the re-scored signals, the
# origin's values joined beside them, and the verdict
_GATE_COLUMNS = (
    *CANDIDATE_SIGNAL_COLUMNS,
    "gate_stage",
    "quality_value_original",
    "loss_before_original",
    "loss_after_original",
    "neighbor_similarity_original",
    "passed",
    "reasons",
)
_OP_OF = {"simplify_only": "simplified", "rewrite_only": "rewritten", "extend_only": "extended"}
# The variants measure the method's rule ("flag"). The default bar, "auto", is "typical" for
# this benchmark's 135M optimizer; what it would accept is reported beside (``default_bar``).
VARIANT_BAR = "flag"


def _one_round(
    settings,
    workdir: Path,
    seed_path: Path = SEED_PATH,
    refine: dict | None = None,
    name="downstream",
    heldout: Path = DOWN_EVAL,
):
    """Run round 1 through the loop (from ``seed_path``; ``refine`` overrides the
    ``refined_samples`` config); the seed table, the round's candidates and sparse order. The
    round's tables stay under ``workdir / "middo"``. ``heldout`` is the pipeline's one held-out
    setting (the ``evaluation`` resource's ``heldout_path``): the gate rejects candidates that copy
    it, and the round's own ``round_evaluation`` scores on it too. By default the larger
    ``DOWN_EVAL`` this benchmark evaluates on, so that no candidate copies any of its items."""
    import polars as pl

    from middo_pipeline.core.storage import Storage
    from middo_pipeline.loop import run_rounds

    home, middo_home = workdir / "dagster_home", workdir / "middo"
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    env = dict(os.environ)
    env.update(
        {
            "MIDDO_HOME": str(middo_home),
            "MIDDO_DEVICE": settings.device,
            "MIDDO_PROFILE": "default",
            "MIDDO_BASE_MODEL": settings.model,
            "MIDDO_OPTIMIZER_MODEL": settings.model,
            "MIDDO_OPTIMIZER_BACKEND": "local",
        }
    )
    config = {
        "ops": {
            "sft_checkpoint": {"config": {"max_length": 384, "batch_size": 8, "seed": settings.seed}},
            "embedding_signals": {"config": {"umap": False}},
            "refined_samples": {
                "config": {
                    "candidates": settings.down_candidates,
                    "acceptance_bar": VARIANT_BAR,
                    **(refine or {}),
                }
            },
        },
        "resources": {"evaluation": {"config": {"heldout_path": str(heldout)}}},
    }
    t0 = time.perf_counter()
    try:
        summaries = run_rounds(1, seed_path=str(seed_path), config=config, env=env, log=lambda m: log(f"{name}: {m}"))
    finally:
        if old is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old
    if not all(s.success for s in summaries):
        raise RuntimeError(f"{name}: the Middo round failed (see the log above)")
    store = Storage(middo_home)
    seed = pl.read_parquet(store.table_path("round_dataset", "round-1"))
    cands = pl.read_parquet(store.table_path("refinement_candidates", "round-1"))
    emb = pl.read_parquet(store.table_path("embedding_signals", "round-1"))
    sparse_order = emb.filter(pl.col("is_sparse")).sort("knn_mean_similarity")["sample_id"].to_list()
    signals = {n: pl.read_parquet(store.table_path(n, "round-1")) for n in ("loss_signals", "quality_signals")}
    info = {
        "seconds": time.perf_counter() - t0,
        "round": summaries[0].metadata,
        "default_bar": default_bar_outcome(cands, **signals),
    }
    return seed, cands, sparse_order, info


def _finished_round(middo_home: Path, settings=None):
    """The same tables from a round that already ran (``--downstream-from MIDDO_HOME``). Its
    stored candidates are judged again by THIS version's gate (``core.gate.gate_round`` with
    the round's own models, thresholds and the refine config's defaults), so that a change
    of the rules is measured on the same candidates; ``--no-regate`` keeps the stored verdicts."""
    import polars as pl

    from middo_pipeline.core.storage import Storage

    store = Storage(middo_home)
    names = ("round_dataset", "refinement_candidates", "embedding_signals", "loss_signals", "quality_signals")
    if settings is None or settings.down_regate:
        names += ("model_readouts",)
    paths = {n: store.table_path(n, "round-1") for n in names}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"--downstream-from {middo_home}: no finished round-1 there (missing {', '.join(missing)})"
        )
    log(f"downstream: reusing round-1 of {middo_home}")
    tables = {n: pl.read_parquet(p) for n, p in paths.items()}  # each read once
    emb = tables["embedding_signals"]
    sparse_order = emb.filter(pl.col("is_sparse")).sort("knn_mean_similarity")["sample_id"].to_list()
    cands = tables["refinement_candidates"]
    info: dict = {"reused_from": str(middo_home), "regated": False}
    if settings is None or settings.down_regate:
        cands, info = (
            _regate(store, cands, tables, settings),
            {
                **info,
                "regated": True,
                "stored_passed": int(cands["passed"].sum()),
            },
        )
    info["default_bar"] = default_bar_outcome(cands, tables["loss_signals"], tables["quality_signals"])
    return tables["round_dataset"], cands, sparse_order, info


def default_bar_outcome(cands, loss_signals, quality_signals) -> dict:
    """What the default ``acceptance_bar: auto`` would accept of these verified candidates: for
    the benchmark's 135M optimizer (it does not follow the stepwise prompt) auto is ``typical``,
    the ``flag`` verdicts plus the round's median loss after training and median quality.
    Re-judged from the stored signals, no forward pass."""
    import polars as pl

    from middo_pipeline.assets.refinement import RefineConfig
    from middo_pipeline.core.gate import round_thresholds
    from middo_pipeline.core.refine import heldout_grams
    from middo_pipeline.core.verify import choose_candidates, resolve_acceptance_bar, verify_candidates

    bar = resolve_acceptance_bar("auto", "direct")
    cfg = RefineConfig()
    th = round_thresholds(loss_signals, quality_signals, cfg.gate_rules(bar))
    verdict = verify_candidates(
        cands.drop([c for c in ("passed", "reasons") if c in cands.columns]),
        th,
        heldout_grams=heldout_grams(DOWN_EVAL, cfg.gate.heldout_ngram),
        ngram=cfg.gate.heldout_ngram,
    )
    # a candidate the flag rule rejected stays rejected (it may have failed a rule whose inputs
    # are not stored, e.g. control tokens of the tokenizer)
    if "passed" in cands.columns:
        verdict = verdict.with_columns((pl.col("passed") & cands["passed"].fill_null(False)).alias("passed"))
    chosen = choose_candidates(verdict)
    by_op = {
        op: int(((chosen["operation"] == op) & (chosen["status"] == "ok")).sum())
        for op in sorted(set(chosen["operation"].to_list()))
    }
    return {
        "bar": bar,
        "why": "auto: a small optimizer (135M parameters)",
        "typical_loss_after": th.typical_loss_after,
        "typical_quality": th.typical_quality,
        "candidates_passed": int(verdict["passed"].sum()),
        "accepted": int((chosen["status"] == "ok").sum()),
        "accepted_by_operation": by_op,
    }


def gate_stored_round(store, cands, tables: dict, settings, heldout: Path, bar: str, cascade: bool = False):
    """``cands`` re-scored and verified by this version's gate (``core.gate.gate_round``) with
    the stored round-1's own models, signal tables and thresholds and the refine config's
    defaults; ``passed`` is never null. ``cascade`` off (the default here): every candidate is
    read in full, so that its signals can be re-judged under other rules."""
    import polars as pl

    from middo_pipeline.assets.refinement import RefineConfig
    from middo_pipeline.core.gate import gate_round
    from middo_pipeline.core.refine import heldout_grams
    from middo_pipeline.models.loading import load_model

    cfg = RefineConfig()
    device = getattr(settings, "device", "auto")
    threads = getattr(settings, "threads", None)
    base = load_model(getattr(settings, "model", None) or DEFAULT_MODEL, device=device, threads=threads)
    trained = load_model(str(store.checkpoint_dir("round-1")), device=device, threads=threads)
    judge = trained if tables["quality_signals"]["quality_mode"][0] in ("judge", "combined") else None
    verified, _ = gate_round(
        cands.select([c for c in cands.columns if c not in _GATE_COLUMNS]),
        model_readouts=tables["model_readouts"],
        loss_signals=tables["loss_signals"],
        quality_signals=tables["quality_signals"],
        embedding_signals=tables["embedding_signals"],
        base=base,
        checkpoint=trained,
        judge_model=judge,
        rules=cfg.gate_rules(bar),
        round_dataset=tables.get("round_dataset"),
        heldout_grams=heldout_grams(heldout, cfg.gate.heldout_ngram),
        ngram=cfg.gate.heldout_ngram,
        cascade=cascade,
    )
    return verified.with_columns(pl.col("passed").fill_null(False))


def _regate(store, cands, tables: dict, settings):
    """The stored candidates re-scored and re-verified with this version's gate."""
    t0 = time.perf_counter()
    verified = gate_stored_round(store, cands, tables, settings, DOWN_EVAL, VARIANT_BAR)
    log(
        f"downstream: re-gated {verified.height} stored candidates in {time.perf_counter() - t0:.0f}s: "
        f"{int(cands['passed'].sum())} passed the stored gate, {int(verified['passed'].sum())} pass this one"
    )
    return verified


def build_variants(seed, cands, sparse_order) -> dict:
    """Every dataset of the comparison, from the same candidates (see the module docstring)."""
    import polars as pl

    from middo_pipeline.core.merge import merge_round
    from middo_pipeline.core.verify import choose_candidates

    gate_on = choose_candidates(cands)
    gate_off = cands.filter(pl.col("candidate") == 0)  # status ok = accepted, unverified
    refined = {"gate_on": gate_on, "gate_off": gate_off}
    for name, op in _OP_OF.items():
        refined[name] = gate_on.filter(pl.col("operation") == op)
    # the placebo: the same rows in another order. Any dataset change reshuffles the training
    # order, so what this does to the measures is the resolution of the comparison
    out = {
        "seed": (seed, {}),
        "seed_reshuffled": (seed.sample(fraction=1.0, shuffle=True, seed=PLACEBO_SEED), {"placebo": True}),
    }
    for name, ref in refined.items():
        res = merge_round(seed, ref, round_number=1, size_policy="keep", max_growth=0.15, sparse_order=sparse_order)
        out[name] = (res.dataset, {"accepted": int((ref["status"] == "ok").sum()), "rows": res.dataset.height})
    return out


# bump when training or evaluation changes what a run produces: cached runs are then not reused
RUN_CACHE_VERSION = 1


def _run_cache_file(settings, df, cfg, eval_path: Path) -> Path | None:
    """Where one (dataset, training config, model, held-out set) run's per-item results are
    kept, so that a later benchmark (e.g. after a change of the gate) does not train the
    unchanged datasets again: training is deterministic on CPU (the seed data's runs of two
    sessions agreed bit for bit). None when ``down_run_cache`` is off."""
    import dataclasses
    import hashlib

    from middo_pipeline.core.schema import fingerprint

    root = getattr(settings, "down_run_cache", None)
    if not root:
        return None
    payload = json.dumps(
        {
            "v": RUN_CACHE_VERSION,
            "data": fingerprint(df),
            "train": dataclasses.asdict(cfg),
            "model": settings.model,
            "eval": hashlib.sha256(eval_path.read_bytes()).hexdigest(),
        },
        sort_keys=True,
        default=str,
    )
    return Path(root).expanduser() / f"run-{hashlib.sha256(payload.encode()).hexdigest()[:20]}.npz"


def train_config(settings, seed: int, max_steps: int = -1, **over):
    """The downstream runs' training: LoRA, one epoch (or ``max_steps``), batch 8, max_length 384."""
    from middo_pipeline.core.training import TrainConfig

    return TrainConfig(
        epochs=1.0,
        max_steps=max_steps,
        batch_size=8,
        max_length=384,
        seed=seed,
        device=settings.device,
        threads=settings.threads,
        logging_steps=10,
        **over,
    )


def train_and_evaluate(settings, df, cfg, eval_df, out: Path) -> tuple[np.ndarray, np.ndarray, dict, str | None]:
    """One training run on ``df`` with ``cfg`` (into ``out``), evaluated on the held-out set:
    per-item correctness and loss (in item-id order), the run's record, and the run-cache file's
    name when the identical run was reused instead of trained."""
    from middo_pipeline.core.evaluation import evaluate
    from middo_pipeline.core.training import train_sft
    from middo_pipeline.models.loading import load_model

    cache_file = _run_cache_file(settings, df, cfg, DOWN_EVAL)
    if cache_file is not None and cache_file.exists():
        hit = np.load(cache_file, allow_pickle=False)
        return hit["correct"], hit["loss"], json.loads(str(hit["record"])), cache_file.name
    tr = train_sft(settings.model, df, out, cfg)
    lm = load_model(str(out), device=settings.device, dtype="auto", threads=settings.threads)
    ev = evaluate(lm.model, lm.tokenizer, eval_df, max_length=384)
    del lm
    items = ev["items"].sort("id") if "id" in ev["items"].columns else ev["items"]
    item_correct = items["correct"].cast(float).to_numpy()
    item_loss = items["loss"].cast(float).to_numpy()
    rec = {
        "steps": tr.steps,
        "rows": df.height,
        "train_tokens": tr.tokens_seen,
        "train_seconds": tr.seconds,
        "mc_accuracy": ev["mc_accuracy"],
        "mean_response_loss": ev["mean_response_loss"],
    }
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = cache_file.with_suffix(".tmp.npz")
        np.savez(tmp_file, correct=item_correct, loss=item_loss, record=json.dumps(rec))
        tmp_file.replace(cache_file)
    return item_correct, item_loss, rec, None


def paired(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of a − b over items with a 95% bootstrap interval (``core.evaluation``)."""
    from middo_pipeline.core.evaluation import paired_difference

    return paired_difference(a, b, n_boot=n_boot, seed=seed)


def runs_items(a_runs: list, b_runs: list, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of a − b over runs and items with a 95% interval that resamples both
    (``core.evaluation.runs_items_difference``)."""
    from middo_pipeline.core.evaluation import runs_items_difference

    return runs_items_difference(np.stack(a_runs), np.stack(b_runs), n_boot=n_boot, seed=seed)


# the verdicts a rollback rule could take from one run per round (``compare_rounds``'s two
# measures): ``pipeline`` is ``optimized_dataset``'s (``core.rollback.regression_verdict`` on
# ``worse_beyond_floor``: a measure significantly worse by more than ``ROLLBACK_NOISE_FLOOR``); ``either`` is
# significance alone (``compare_rounds``'s ``worse``, the ``no_regression`` check's verdict)
ROLLBACK_RULES = ("pipeline", "either", "both", "mc", "loss")


def _rule_verdicts(cmp: dict) -> dict[str, bool]:
    from middo_pipeline.core.rollback import worse_beyond_floor

    significant = worse_beyond_floor(cmp, {"mc_accuracy": 0.0, "response_loss": 0.0})
    mc, loss = "mc_accuracy" in significant, "response_loss" in significant
    # the round's data always holds rows the round before made here, so the pipeline rolls
    # back exactly when a measure is worse beyond its floor
    pipeline = bool(worse_beyond_floor(cmp))
    return {"pipeline": pipeline, "either": bool(cmp["worse"]), "both": mc and loss, "mc": mc, "loss": loss}


def _pair_verdicts(c_prev, l_prev, c_this, l_this, mask=slice(None)) -> dict[str, bool]:
    """``_rule_verdicts`` of one run as the round before (``prev``) and another as this round,
    on the items of ``mask``: ``core.evaluation.compare_rounds`` as ``optimized_dataset`` reads it."""
    import polars as pl

    from middo_pipeline.core.evaluation import compare_rounds

    c_prev, l_prev, c_this, l_this = (np.asarray(x)[mask] for x in (c_prev, l_prev, c_this, l_this))
    ids = list(range(len(c_prev)))
    before = pl.DataFrame({"id": ids, "correct": c_prev.astype(bool), "loss": l_prev})
    after = pl.DataFrame({"id": ids, "correct": c_this.astype(bool), "loss": l_this})
    return _rule_verdicts(compare_rounds(before, after))


def rollback_null(
    correct: list, loss: list, subset: np.ndarray | None = None, n_boot: int = 2000, seed: int = 0
) -> dict:
    """How often each rollback rule fires when the data did not change, only training order:
    ``correct`` / ``loss`` are runs of the same rows (the seed data at every training seed and
    its reshuffles), and every ordered pair of two different runs is one round-before / round
    verdict. ``rate`` is the fraction of the R(R−1) pairs that fire; pairs share runs, so the
    interval comes from resampling the runs (with replacement; a run drawn twice is not paired
    with itself). ``subset`` adds the same on those items (the pipeline's default held-out set)."""

    def table(mask) -> dict:
        r = len(correct)
        v = {rule: np.zeros((r, r), dtype=bool) for rule in ROLLBACK_RULES}
        for i in range(r):
            for j in range(r):
                if i != j:
                    for rule, fired in _pair_verdicts(correct[i], loss[i], correct[j], loss[j], mask).items():
                        v[rule][i, j] = fired
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, r, size=(n_boot, r))
        out = {}
        for rule, m in v.items():
            boot = []
            for d in draws:
                off = d[:, None] != d[None, :]
                if off.any():
                    boot.append(m[np.ix_(d, d)][off].mean())
            off = ~np.eye(r, dtype=bool)
            # disjoint pairs (run 0 before run 1, 2 before 3, ...): independent verdicts, exact interval
            k, n = int(sum(m[i, i + 1] for i in range(0, r - 1, 2))), r // 2
            out[rule] = {
                "fired": int(m[off].sum()),
                "rate": float(m[off].mean()),
                "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                "disjoint_pairs": {"fired": k, "of": n, "ci95": _clopper_pearson(k, n)},
            }
        return out

    if len(correct) < 2:
        return {"runs": len(correct), "pairs": 0}
    got = {"runs": len(correct), "pairs": len(correct) * (len(correct) - 1), "rules": table(slice(None))}
    if subset is not None:
        got["pipeline_eval"] = {"items": int(np.sum(subset)), "rules": table(np.asarray(subset, dtype=bool))}
    return got


def _clopper_pearson(k: int, n: int, level: float = 0.95) -> list[float]:
    """Exact binomial interval of k successes in n trials."""
    from scipy.stats import beta

    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return [lo, hi]


def rollback_by_seed(
    seed_correct: list, seed_loss: list, var_correct: list, var_loss: list, subset: np.ndarray | None = None
) -> dict:
    """What the pipeline's rollback rule (``optimized_dataset``, ``on_regression: rollback``)
    would decide if this variant were a round's data and the seed data the round before: per
    training seed, ``core.evaluation.compare_rounds`` of the two runs' items (one run each,
    the same seed, as the loop trains every round). ``by_seed`` / ``fired`` are the pipeline's
    rule; ``rules`` counts how often each of ``ROLLBACK_RULES`` would fire (``either``: a
    measure significantly worse, no noise floor; ``both``: MC accuracy and response loss
    significantly worse; ``mc`` / ``loss``: that measure alone).
    ``subset`` (a boolean mask over the items) adds the verdicts on those items alone: the
    pipeline's default held-out set is a subset."""

    def verdicts(mask) -> list[dict[str, bool]]:
        return [
            _pair_verdicts(c_s, l_s, c_v, l_v, mask)
            for c_s, l_s, c_v, l_v in zip(seed_correct, seed_loss, var_correct, var_loss)
        ]

    def summary(got: list[dict[str, bool]]) -> dict:
        fired = [v["pipeline"] for v in got]
        return {
            "by_seed": fired,
            "fired": sum(fired),
            "rules": {rule: sum(v[rule] for v in got) for rule in ROLLBACK_RULES},
        }

    got = summary(verdicts(slice(None)))
    got["of"] = len(seed_correct)
    if subset is not None:
        got["pipeline_eval"] = {"items": int(np.sum(subset)), **summary(verdicts(np.asarray(subset, dtype=bool)))}
    return got


def run(settings, models=None) -> dict:
    from middo_pipeline.core.evaluation import load_eval_set

    if not DOWN_EVAL.exists():
        return {"skipped": True, "reason": f"{DOWN_EVAL} not found"}
    eval_df = load_eval_set(DOWN_EVAL)
    subset = pipeline_eval_mask(eval_df)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="middo-bench-down-") as tmp:
        tmp = Path(tmp)
        if settings.down_from:
            seed_df, cands, sparse_order, loop_info = _finished_round(Path(settings.down_from), settings)
        else:
            log("downstream: one Middo round (verified refinement) through the Dagster loop")
            seed_df, cands, sparse_order, loop_info = _one_round(settings, tmp)
        datasets = build_variants(seed_df, cands, sparse_order)
        names = [v for v in VARIANTS if v in datasets and v in settings.down_variants]
        log("downstream: " + ", ".join(f"{n} {datasets[n][0].height} rows" for n in names))
        runs: dict[str, list[dict]] = {}
        correct: dict[str, list[np.ndarray]] = {}
        losses: dict[str, list[np.ndarray]] = {}
        seed_steps: dict[int, int] = {}
        # the headline first (seed, gate on, gate off over every seed), then the one-operation
        # ablation, then equal steps: a run stopped early has the most important figures complete
        head = [n for n in names if n in ("seed", "gate_on", "gate_off")]
        plan = [(s, n, "epoch") for s in settings.down_seeds for n in head]
        plan += [(s, n, "epoch") for s in settings.down_seeds for n in names if n not in head]
        plan += [
            (s, n, "steps")
            for s in settings.down_seeds
            for n in settings.down_equal_steps
            if n in names and n != "seed"
        ]
        epoch_steps: dict[tuple[str, int], int] = {}
        for s, name, budget in plan:
            df = datasets[name][0]
            steps = seed_steps[s] if budget == "steps" else -1
            if budget == "steps" and epoch_steps.get((name, s)) == steps:
                # one epoch already was the seed's number of steps: that run IS the equal-steps run
                key = f"{name}@equal_steps"
                correct.setdefault(key, []).append(correct[name][settings.down_seeds.index(s)])
                losses.setdefault(key, []).append(losses[name][settings.down_seeds.index(s)])
                runs.setdefault(key, []).append({**runs[name][settings.down_seeds.index(s)], "same_as_epoch_run": True})
                log(f"downstream: {key} seed {s}: one epoch was already {steps} steps, not trained again")
                continue
            cfg = train_config(settings, s, steps)
            key = name if budget == "epoch" else f"{name}@equal_steps"
            item_correct, item_loss, rec, cache_name = train_and_evaluate(
                settings, df, cfg, eval_df, tmp / f"{name}-{budget}-{s}"
            )
            if cache_name:
                log(f"downstream: {key} seed {s}: reused the identical run in {cache_name}")
            if name == "seed" and budget == "epoch":
                seed_steps[s] = rec["steps"]
            if budget == "epoch":
                epoch_steps[(name, s)] = rec["steps"]
            correct.setdefault(key, []).append(item_correct)
            losses.setdefault(key, []).append(item_loss)
            runs.setdefault(key, []).append({"seed": s, **rec})
            log(
                f"downstream: {key} seed {s}: {rec['steps']} steps, mc_accuracy {rec['mc_accuracy']:.3f}, "
                f"loss {rec['mean_response_loss']:.3f}"
            )
            if settings.down_partial:
                # after every run: what is complete so far, in the final layout
                from benchmarks.common import write_json_atomic

                part = _summarize(runs, correct, losses, subset, null=False)  # the null pairs: at the end
                write_json_atomic(
                    Path(settings.down_partial),
                    {"partial": True, "runs_done": sum(map(len, runs.values())), "runs_planned": len(plan), **part},
                )

    part = _summarize(runs, correct, losses, subset)
    return {
        "skipped": False,
        "eval_file": DOWN_EVAL.name,
        "eval_items": eval_df.height,
        "seeds": list(settings.down_seeds),
        "candidates_per_sample": settings.down_candidates,
        "loop": loop_info,
        "candidates": {"total": cands.height, "passed": int(cands["passed"].sum())},
        "datasets": {k: v[1] | {"rows": v[0].height} for k, v in datasets.items()},
        **part,
        "seconds": time.perf_counter() - t_start,
        "runs": runs,
        # per held-out item (in id order), averaged over the runs: which items a data change moved
        "item_ids": sorted(eval_df["id"].to_list()) if "id" in eval_df.columns else None,
        "item_mean_correct": {k: np.mean(np.stack(v), axis=0).round(4).tolist() for k, v in correct.items()},
        "item_mean_loss": {k: np.mean(np.stack(v), axis=0).round(4).tolist() for k, v in losses.items()},
        "note": "small scale: 135M model, LoRA, one epoch on ~200 samples, 240 held-out items",
    }


def pipeline_eval_mask(eval_df) -> np.ndarray | None:
    """Which of the benchmark's items (in item-id order, as the runs report them) are in the
    pipeline's default held-out set; None when the file is missing or the ids have no column."""
    from middo_pipeline.core.evaluation import load_eval_set

    if not PIPELINE_EVAL.exists() or "id" not in eval_df.columns:
        return None
    ids = set(load_eval_set(PIPELINE_EVAL)["id"].to_list())
    return np.array([i in ids for i in sorted(eval_df["id"].to_list())])


def _summarize(runs: dict, correct: dict, losses: dict, subset: np.ndarray | None = None, null: bool = True) -> dict:
    """Per variant: accuracy and loss over seeds, and the paired per-item comparison with the
    seed data (over the seeds both have: the same items, the same seeds, only the data differ)."""

    summary, by_op = {}, {}
    if "seed" not in correct:
        return {"variants": {}}
    for key in correct:
        acc = [r["mc_accuracy"] for r in runs[key]]
        entry = {
            "mc_accuracy_mean": float(np.mean(acc)),
            "mc_accuracy_by_seed": acc,
            "mean_response_loss_mean": float(np.mean([r["mean_response_loss"] for r in runs[key]])),
            "rows": runs[key][0]["rows"],
            "steps": [r["steps"] for r in runs[key]],
        }
        if key != "seed":
            k = min(len(correct[key]), len(correct["seed"]))  # seeds in plan order: the first k match
            c_v, c_s = np.mean(np.stack(correct[key][:k]), axis=0), np.mean(np.stack(correct["seed"][:k]), axis=0)
            l_v, l_s = np.mean(np.stack(losses[key][:k]), axis=0), np.mean(np.stack(losses["seed"][:k]), axis=0)
            entry["seeds_compared"] = k
            entry["mc_accuracy_diff_vs_seed"] = paired(c_v, c_s)
            # lower loss is better: report seed − variant so that > 0 means the variant is better
            entry["response_loss_improvement_vs_seed"] = paired(l_s, l_v)
            # the same means with the run-to-run spread in the interval (items and runs resampled)
            entry["mc_accuracy_diff_vs_seed_runs_items"] = runs_items(correct[key][:k], correct["seed"][:k])
            entry["response_loss_improvement_vs_seed_runs_items"] = runs_items(losses["seed"][:k], losses[key][:k])
            entry["rollback"] = rollback_by_seed(
                correct["seed"][:k], losses["seed"][:k], correct[key][:k], losses[key][:k], subset
            )
        summary[key] = entry
        if key in _OP_OF:
            by_op[_OP_OF[key]] = entry.get("mc_accuracy_diff_vs_seed")
    on, off = summary.get("gate_on", {}), summary.get("gate_off", {})
    same_rows = [k for k in ("seed", "seed_reshuffled") if k in correct]
    return {
        "variants": summary,
        # the false-rollback rate of each rule: pairs of runs of the same rows (other order only)
        "rollback_null": rollback_null(
            [c for k in same_rows for c in correct[k]], [x for k in same_rows for x in losses[k]], subset
        )
        if null
        else None,
        "downstream_mc_accuracy_diff": (on.get("mc_accuracy_diff_vs_seed") or {}).get("mean"),
        "downstream_mc_accuracy_diff_ci": (on.get("mc_accuracy_diff_vs_seed") or {}).get("ci95"),
        "downstream_mc_accuracy_diff_ci_runs_items": (on.get("mc_accuracy_diff_vs_seed_runs_items") or {}).get("ci95"),
        "downstream_placebo_diff_ci_runs_items": (
            summary.get("seed_reshuffled", {}).get("mc_accuracy_diff_vs_seed_runs_items") or {}
        ).get("ci95"),
        "downstream_gate_off_diff": (off.get("mc_accuracy_diff_vs_seed") or {}).get("mean"),
        "downstream_gate_off_diff_ci": (off.get("mc_accuracy_diff_vs_seed") or {}).get("ci95"),
        "downstream_gate_off_diff_ci_runs_items": (off.get("mc_accuracy_diff_vs_seed_runs_items") or {}).get("ci95"),
        "downstream_by_operation": by_op,
    }
