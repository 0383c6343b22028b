"""Effectiveness: does each signal find the defect it is meant to find?

The controlled dataset (``controlled.py``: seed samples plus labelled, injected defects) goes
through one round's diagnosis the way the pipeline runs it:

1. response loss under the base model (``score_samples``, no embeddings) -- "before";
2. a short LoRA fine-tune of the default model on the controlled set (``train_sft``);
3. one pass of the checkpoint for loss + prompt embedding -- "after";
4. diversity: ``topk_cosine`` (k=2) and ``sparsity_scores`` on those embeddings;
5. quality: the checkpoint judges itself, ``expected_scores`` -> ``combine_scores``;
6. flags at the pipeline's default threshold, m = 1 (``flag_both_above`` for hard,
   ``flag_below`` for sparse and low quality).

For each signal and its own defect type: precision and recall of the flags, and AUROC of the
raw score (complexity: loss after training; diversity: minus the top-k mean similarity;
quality: minus the quality score). Positives are the rows with that defect; negatives are
*all other rows*, other injected defects included (harder than clean-only: an unrelated
answer also has a high loss). AUROC against clean rows only is reported beside it, and the
quality AUROC per defect kind.

The quality judge's speed comparison (``judge.compare``) also runs here, on ``judge_samples``
controlled rows (half of them quality defects) and the trained checkpoint, so that the expected scores of
those rows are computed once and the Spearman correlation is measured on samples with a real
spread of quality.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import controlled, judge
from benchmarks.common import load_seed_rows, log, prompts_responses


def _auroc(y: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    ok = np.isfinite(score)
    y, score = y[ok], score[ok]
    if y.sum() == 0 or y.sum() == len(y):
        return None
    return float(roc_auc_score(y, score))


def _pr(y: np.ndarray, flagged: np.ndarray) -> dict:
    tp = int((y & flagged).sum())
    nf, npos = int(flagged.sum()), int(y.sum())
    return {
        "precision": tp / nf if nf else None,
        "recall": tp / npos if npos else None,
        "flagged": nf,
        "positives": npos,
        "true_positives": tp,
    }


def evaluate_signal(
    defect: np.ndarray,
    target: str,
    score: np.ndarray,
    flagged: np.ndarray,
    kinds: np.ndarray | None = None,
    threshold: float | None = None,
) -> dict:
    y = defect == target
    clean = defect == "none"
    out = {"auroc": _auroc(y, score), **_pr(y, flagged), "threshold": threshold}
    sub = y | clean
    out["auroc_vs_clean_only"] = _auroc(y[sub], score[sub])
    if kinds is not None:
        out["auroc_by_kind_vs_clean"] = {}
        for k in sorted(set(kinds[y].tolist())):
            m = (kinds == k) | clean
            out["auroc_by_kind_vs_clean"][k] = _auroc((kinds == k)[m], score[m])
    return out


def _judge_subset(defect: np.ndarray, n: int) -> np.ndarray:
    """Rows for the judge comparison: half quality defects, half the others (clean first),
    evenly spread, so that the scores being correlated have a real spread of quality."""
    n = min(n, len(defect))
    q = np.flatnonzero(defect == "quality")
    clean = np.flatnonzero(defect == "none")
    other = np.flatnonzero((defect != "quality") & (defect != "none"))
    n_q = min(len(q), n // 2)
    pick_q = q[np.linspace(0, len(q) - 1, n_q).round().astype(int)] if n_q else q[:0]
    rest = np.concatenate([clean, other])
    n_r = min(len(rest), n - n_q)
    pick_r = (
        rest[np.linspace(0, len(clean) - 1 if len(clean) >= n_r else len(rest) - 1, n_r).round().astype(int)]
        if n_r
        else rest[:0]
    )
    return np.unique(np.concatenate([pick_q, pick_r]))


def auroc_ci(y: np.ndarray, score: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """AUROC with a 95% percentile bootstrap interval (positives and negatives resampled
    separately, so every resample has both)."""
    from sklearn.metrics import roc_auc_score

    ok = np.isfinite(score)
    y, score = np.asarray(y, dtype=bool)[ok], np.asarray(score, dtype=np.float64)[ok]
    pos, neg = score[y], score[~y]
    if len(pos) == 0 or len(neg) == 0:
        return {"auroc": None, "ci95": None, "positives": int(len(pos)), "negatives": int(len(neg))}
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    boots = [roc_auc_score(labels, np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(n_boot)]
    return {
        "auroc": float(roc_auc_score(labels, np.r_[pos, neg])),
        "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        "positives": int(len(pos)),
        "negatives": int(len(neg)),
    }


def _vs_clean(defect, kinds, target_mask, score, n_boot, seed) -> dict:
    clean = defect == "none"
    m = target_mask | clean
    return auroc_ci(target_mask[m], score[m], n_boot, seed)


# embedding variants measured for the diversity signal: (pooling, layer, top components removed)
EMBEDDING_VARIANTS = [
    ("mean", "last", 0),
    ("mean", "last", 1),
    ("last", "last", 0),
    ("last", "last", 1),
    ("mean", "middle", 0),
    ("mean", "middle", 1),
    ("last", "middle", 0),
    ("last", "middle", 1),
]


def run(settings, models, with_judge: bool = True) -> dict:
    import polars as pl

    from middo_pipeline.core import diversity, neighbours, quality
    from middo_pipeline.core.forward import EmbeddingSpec, score_samples
    from middo_pipeline.core.ifd import ifd_scores, unconditional_loss
    from middo_pipeline.core.schema import make_samples
    from middo_pipeline.core.thresholds import ThresholdSpec, flag_below, flag_both_above
    from middo_pipeline.core.training import TrainConfig, train_sft
    from middo_pipeline.core.verify import QualityScale, quality_value
    from middo_pipeline.models.loading import load_model

    s = settings
    rows = controlled.build(
        load_seed_rows(),
        n_clean=s.det_clean,
        n_quality=s.det_quality,
        n_hard=s.det_hard,
        n_dup_clusters=s.det_dup_clusters,
        dup_size=s.det_dup_size,
        n_isolated=s.det_isolated,
        seed=s.seed,
        clean_siblings=s.det_clean_siblings,
    )
    defect = np.asarray([r["defect"] for r in rows])
    kinds = np.asarray([r["kind"] for r in rows])
    prompts, responses = prompts_responses(rows)
    counts = {d: int((defect == d).sum()) for d in sorted(set(defect.tolist()))}
    log(f"detection: controlled set of {len(rows)} rows {counts}")
    timings = {}
    nb = s.det_bootstrap

    base = models.get()
    t0 = time.perf_counter()
    before = score_samples(
        base.model,
        base.tokenizer,
        prompts,
        responses,
        max_length=s.det_max_length,
        max_batch_tokens=8192,
        with_embeddings=False,
    )
    uncond = unconditional_loss(
        base.model, base.tokenizer, responses, max_length=s.det_max_length, max_batch_tokens=8192
    )
    timings["loss_before_and_prompt_free"] = time.perf_counter() - t0
    log(f"detection: base-model losses (with and without the prompt) {timings['loss_before_and_prompt_free']:.1f}s")

    samples = make_samples(rows)
    steps = s.det_train_steps if s.det_train_steps > 0 else -1
    cfg = TrainConfig(
        max_steps=steps,
        epochs=s.det_epochs,
        batch_size=s.det_batch_size,
        max_length=s.det_max_length,
        seed=s.seed,
        device=s.device,
        threads=s.threads,
        logging_steps=5,
    )
    with tempfile.TemporaryDirectory(prefix="middo-bench-det-") as tmp:
        t0 = time.perf_counter()
        tr = train_sft(s.model, samples, Path(tmp) / "ckpt", cfg)
        timings["train"] = time.perf_counter() - t0
        log(
            f"detection: LoRA training {tr.steps} steps ({tr.steps * s.det_batch_size / len(rows):.2f} epochs) "
            f"in {timings['train']:.1f}s (final loss {tr.final_loss:.3f})"
        )
        ck = load_model(str(Path(tmp) / "ckpt"), device=s.device, dtype="auto", threads=s.threads)

        t0 = time.perf_counter()
        embeddings = {}
        after = None
        for pooling, layer in sorted({(p, layer_) for p, layer_, _ in EMBEDDING_VARIANTS}):
            res = score_samples(
                ck.model,
                ck.tokenizer,
                prompts,
                responses,
                max_length=s.det_max_length,
                max_batch_tokens=8192,
                with_embeddings=True,
                embedding=EmbeddingSpec(pooling=pooling, layer=layer),
            )
            embeddings[(pooling, layer)] = res.embedding
            after = after or res
        timings["loss_embedding_after"] = time.perf_counter() - t0
        log(
            f"detection: loss + {len(embeddings)} embedding variants after training {timings['loss_embedding_after']:.1f}s"
        )

        knn_by_variant = {}
        t0 = time.perf_counter()
        for pooling, layer, pcs in EMBEDDING_VARIANTS:
            emb = diversity.TopComponents(pcs).fit(embeddings[(pooling, layer)]).transform(embeddings[(pooling, layer)])
            sims, _idx = neighbours.topk_cosine(emb, k=2)
            knn_by_variant[(pooling, layer, pcs)] = np.asarray(diversity.sparsity_scores(sims), dtype=np.float64)
        timings["knn"] = time.perf_counter() - t0

        # the judge comparison (ours vs generate-then-parse) runs here, on a spread of the
        # controlled rows and this checkpoint: the self-judge the pipeline uses
        jsub = _judge_subset(defect, s.judge_samples) if with_judge else np.zeros(0, dtype=int)
        n_j = len(jsub)
        rest = np.setdiff1d(np.arange(len(rows)), jsub)
        scores6 = np.full((len(rows), 6), np.nan)
        judge_block = None
        t_q = 0.0
        if n_j:
            judge_block, s6 = judge.compare(ck, [prompts[i] for i in jsub], [responses[i] for i in jsub], s)
            scores6[jsub] = s6
            t_q += judge_block["expected"]["seconds"]
            judge_block["model"] = "the detection checkpoint (LoRA-trained on the controlled set)"
            judge_block["samples_from"] = "controlled set rows " + ",".join(map(str, jsub.tolist()))
            judge_block["defects_of_samples"] = [rows[i]["defect"] for i in jsub]
        t0 = time.perf_counter()
        info: dict = {}
        if len(rest):
            scores6[rest] = quality.expected_scores(
                ck.model,
                ck.tokenizer,
                [prompts[i] for i in rest],
                [responses[i] for i in rest],
                max_length=512,
                info=info,
            )
        t_q += time.perf_counter() - t0
        combined = quality.combine_scores(scores6)
        q = np.asarray(combined["quality_score"], dtype=np.float64)
        timings["quality_expected"] = t_q
        timings["judge_path"] = info.get("judge_path")
        log(f"detection: quality judgements (expected, {info.get('judge_path')}) {t_q:.1f}s")
        del ck

    spec = ThresholdSpec(m=[1.0])
    lb, la = before.loss.astype(np.float64), after.loss.astype(np.float64)
    ifd = ifd_scores(lb, uncond.loss)
    res_b, res_a, hard = flag_both_above(lb, la, spec, 1)

    # diversity: every embedding variant, isolated vs clean (the clean rows have paraphrase siblings)
    iso = defect == "isolated"
    variants = {}
    for key, knn in knn_by_variant.items():
        variants["pool={}/layer={}/pcs={}".format(*key)] = _vs_clean(defect, kinds, iso, -knn, nb, s.seed)
    best_key = max(knn_by_variant, key=lambda k: variants["pool={}/layer={}/pcs={}".format(*k)]["auroc"] or -1)
    default_key = tuple(s.det_embedding)
    knn = knn_by_variant[default_key]
    sparse = flag_below(knn, spec, 1)

    # quality: the self-judge, IFD and their combination, per defect kind vs clean rows
    qvals = {mode: quality_value(QualityScale.fit(mode, q, ifd), q, ifd) for mode in ("judge", "ifd", "combined")}
    by_mode = {}
    for mode, v in qvals.items():
        by_kind = {k: _vs_clean(defect, kinds, kinds == k, -v, nb, s.seed) for k in controlled.QUALITY_KINDS}
        by_mode[mode] = {
            "all_quality_kinds": _vs_clean(defect, kinds, defect == "quality", -v, nb, s.seed),
            "by_kind": by_kind,
        }
    qv = qvals[s.det_quality_mode]
    low = flag_below(qv, spec, 1)

    out = {
        "rows": len(rows),
        "counts": counts,
        "counts_by_kind": {k: int((kinds == k).sum()) for k in sorted(set(kinds.tolist()))},
        "train": {
            "steps": tr.steps,
            "epochs": round(tr.steps * s.det_batch_size / len(rows), 3),
            "batch_size": s.det_batch_size,
            "max_length": s.det_max_length,
            "lora": True,
            "final_loss": tr.final_loss,
            "samples_seen": tr.steps * s.det_batch_size,
        },
        "timings_s": timings,
        "m": 1.0,
        "bootstrap_resamples": nb,
        "complexity": evaluate_signal(
            defect, "hard", la, np.asarray(hard, dtype=bool), kinds, threshold=float(res_a.threshold)
        ),
        "diversity": evaluate_signal(
            defect, "isolated", -knn, np.asarray(sparse.flagged, dtype=bool), kinds, threshold=float(sparse.threshold)
        ),
        "quality": evaluate_signal(
            defect, "quality", -qv, np.asarray(low.flagged, dtype=bool), kinds, threshold=float(low.threshold)
        ),
    }
    out["complexity"]["vs_clean"] = _vs_clean(defect, kinds, defect == "hard", la, nb, s.seed)
    out["complexity"]["auroc_loss_before"] = _auroc(defect == "hard", lb)
    out["diversity"]["embedding"] = "pool={}/layer={}/pcs={}".format(*default_key)
    out["diversity"]["vs_clean"] = variants["pool={}/layer={}/pcs={}".format(*default_key)]
    out["diversity"]["variants_vs_clean"] = variants
    out["diversity"]["best_variant"] = "pool={}/layer={}/pcs={}".format(*best_key)
    out["diversity"]["mean_similarity_by_defect"] = {d: float(np.nanmean(knn[defect == d])) for d in counts}
    out["complexity"]["mean_loss_after_by_defect"] = {d: float(np.nanmean(la[defect == d])) for d in counts}
    out["quality"]["mode"] = s.det_quality_mode
    out["quality"]["modes_vs_clean"] = by_mode
    out["quality"]["mean_judge_score_by_kind"] = {
        k: float(np.nanmean(q[kinds == k])) for k in sorted(set(kinds.tolist()))
    }
    out["quality"]["mean_ifd_by_kind"] = {k: float(np.nanmean(ifd[kinds == k])) for k in sorted(set(kinds.tolist()))}
    out["quality"]["missing_judgements"] = int(np.isnan(np.asarray(scores6, dtype=np.float64)).sum())
    out["detection_auroc"] = {
        "complexity": out["complexity"]["vs_clean"]["auroc"],
        "diversity": out["diversity"]["vs_clean"]["auroc"],
        "quality": by_mode[s.det_quality_mode]["all_quality_kinds"]["auroc"],
    }
    out["detection_auroc_ci95"] = {
        "complexity": out["complexity"]["vs_clean"]["ci95"],
        "diversity": out["diversity"]["vs_clean"]["ci95"],
        "quality": by_mode[s.det_quality_mode]["all_quality_kinds"]["ci95"],
    }
    out["quality_auroc_by_kind"] = {k: v["auroc"] for k, v in by_mode[s.det_quality_mode]["by_kind"].items()}
    out["quality_auroc_by_kind_ci95"] = {k: v["ci95"] for k, v in by_mode[s.det_quality_mode]["by_kind"].items()}
    if judge_block is not None:
        out["judge"] = judge_block
    out["table"] = pl.DataFrame(
        {
            "row": [r["row"] for r in rows],
            "defect": defect.tolist(),
            "kind": kinds.tolist(),
            "loss_before": lb,
            "loss_after": la,
            "loss_prompt_free": uncond.loss.astype(np.float64),
            "ifd": ifd,
            "knn_mean_similarity": knn,
            "quality_score": q,
        }
    ).to_dicts()
    return out
