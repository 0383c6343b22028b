"""The verification gate against candidates whose verdict is known: what it accepts of good
refinements, and what it lets in of bad ones.

On the default a 135M optimizer writes nothing worth keeping, so the pipeline's rounds say
only that the gate rejects its output. What the gate would do with a strong optimizer's
output cannot be measured by running one here; but the controlled set (``controlled.py``)
knows, for every defective row it made, the clean seed sample it was made from. So:

1. One round runs for real through the Dagster loop (``loop.run_rounds``, as the downstream
   benchmark's) with the controlled set as its seed: training, readouts, signals, the plan
   of operations, the optimizer's own candidates (``gate_candidates`` per flagged sample)
   and the gate.
2. For every planned operation, candidates of known kind, built here, not generated:

   - ``good``: for a rewrite or simplification, the clean seed sample the row was made from
     (it is not in the round's data, so the checkpoint has not seen it); for an extension of
     an isolated row, another task in its rare domain with a correct answer, written for this
     benchmark (``controlled.EXTENSIONS``);
   - ``unchanged``: the flagged row itself, returned as it was (a do-nothing optimizer; made
     for every planned operation, extensions included);
   - ``garbled``: the good sample with its prompt's words shuffled and letters scrambled;
   - ``unrelated``: the good sample's prompt with the response of a seed sample of another
     category;
   - ``paraphrase`` (extensions of isolated items only): the isolated task itself in other
     words, its answer reworded (``controlled.PARAPHRASES``): an extension that adds no new
     task, which the near-duplicate rule is there to turn away.

3. All of them go through ``core.gate.gate_round`` with the round's own models and stored
   thresholds (what ``refined_samples`` runs), under the method's bar (``flag``); then the
   verdicts are taken again from the re-scored signals (no forward pass) under ``typical``
   (the default for a small optimizer), under both bars with the ``near_origin`` rule off
   (what that rule costs and catches), and under ``typical`` with the medians of the round's
   clean rows only (the controlled set is half defective, which makes its own medians lax; a
   clean data set sets the bar these rows do), and under both bars with near-duplicates
   decided by the cosine alone (``duplicate_same_task`` off: what reading the words adds).
   The round's own optimizer candidates are judged again beside them.

Reported per bar and candidate kind (and per operation): accepted / judged with a 95% Wilson
interval, and the reasons good candidates were turned away. Each candidate is judged alone
(the pipeline accepts the best passing one of k; here k = 1 per kind). Wrong-fact rows have no
origin sample (their good rewrite would need the right answer written), and an extension of a
row that is not an isolated item has no written one, so neither gets a ``good`` candidate.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import controlled
from benchmarks.common import load_seed_rows, log

KINDS = ("good", "unchanged", "garbled", "unrelated", "paraphrase", "optimizer")
BAD_KINDS = ("unchanged", "garbled", "unrelated", "paraphrase")
BARS = ("flag", "typical")


def _norm(text: str | None) -> str:
    return " ".join(str(text or "").split())


def row_key(instruction, input_, output) -> tuple[str, str, str]:
    """How a round's sample is matched to the controlled row it came from (whitespace-insensitive)."""
    return _norm(instruction), _norm(input_), _norm(output)


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a proportion k / n (None when n == 0)."""
    if n <= 0:
        return None
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, mid - half), min(1.0, mid + half)]


def _candidate(planned: dict, row: dict, kind: str, instruction: str, input_: str, output: str) -> dict:
    """One candidate row in the shape of ``operations.run_operations``' (generated, not cut)."""
    return {
        "origin_id": planned["origin_id"],
        "operation": planned["operation"],
        "instruction_before": planned["instruction_before"],
        "input_before": planned["input_before"],
        "output_before": planned["output_before"],
        "instruction_after": instruction,
        "input_after": input_,
        "output_after": output,
        "status": "ok",
        "failure_reason": None,
        "truncated": False,
        "candidate": KINDS.index(kind),
        "known_kind": kind,
        "defect": row["defect"],
        "defect_kind": row["kind"],
    }


def known_candidates(planned, rows: list[dict], seed_rows: list[dict], seed: int = 0):
    """Candidates of known kind for the round's planned operations.

    ``planned``: one row per planned operation (``origin_id``, ``operation``,
    ``instruction_before``, ``input_before``, ``output_before``); ``rows``: the controlled
    set; ``seed_rows``: the seed it was built from. Returns candidate rows in the shape of
    ``operations.run_operations`` (``status`` ok, not truncated) with ``known_kind`` and the
    controlled row's ``defect`` / ``defect_kind``; and the number of planned operations that
    matched no controlled row (0 unless the round's ingestion changed a text)."""
    import polars as pl

    from middo_pipeline.core.schema import EXTENDED

    rng = random.Random(seed)
    by_key = {row_key(r["instruction"], r["input"], r["output"]): r for r in rows}
    out: list[dict] = []
    unmatched = 0
    for p in planned.iter_rows(named=True):
        r = by_key.get(row_key(p["instruction_before"], p["input_before"], p["output_before"]))
        if r is None:
            unmatched += 1
            continue
        out.append(_candidate(p, r, "unchanged", r["instruction"], r["input"], r["output"]))
        src = int(r.get("source_index", -1))
        if p["operation"] == EXTENDED:  # a good extension: another task in the row's rare domain
            if r["instruction"] not in controlled.EXTENSIONS:
                continue
            q, a = controlled.EXTENSIONS[r["instruction"]]
            g = {"instruction": q, "input": "", "output": a, "category": r.get("category", "")}
        elif src >= 0 and r["defect"] in ("quality", "hard"):
            g = seed_rows[src]
        else:
            continue
        out.append(_candidate(p, r, "good", g["instruction"], g.get("input", ""), g["output"]))
        garbled_input = controlled.garble(g["input"], rng) if g.get("input") else ""
        out.append(_candidate(p, r, "garbled", controlled.garble(g["instruction"], rng), garbled_input, g["output"]))
        others = [s for s in seed_rows if s.get("category", "") != g.get("category", "")] or seed_rows
        out.append(_candidate(p, r, "unrelated", g["instruction"], g.get("input", ""), rng.choice(others)["output"]))
        if p["operation"] == EXTENDED:  # the isolated task again, reworded: no new task
            q, a = controlled.PARAPHRASES[r["instruction"]]
            out.append(_candidate(p, r, "paraphrase", q, "", a))
    return pl.DataFrame(out, infer_schema_length=None), unmatched


def tally(verdicts, by: tuple[str, ...] = ("known_kind",)) -> dict:
    """accepted / judged with a Wilson interval per group of ``by``."""
    out: dict = {}
    for key, grp in verdicts.group_by(list(by), maintain_order=True):
        n, k = grp.height, int(grp["passed"].sum())
        out["/".join(map(str, key))] = {"accepted": k, "judged": n, "rate": k / n if n else None, "ci": wilson(k, n)}
    return dict(sorted(out.items()))


def _reasons(verdicts, kind: str) -> dict:
    import polars as pl

    rej = verdicts.filter((pl.col("known_kind") == kind) & ~pl.col("passed"))
    counts: dict[str, int] = {}
    for text in rej["reasons"].to_list():
        for reason in (text or "failed").split("; "):
            counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def judge(
    cands,
    tables: dict,
    store,
    settings,
    heldout: Path,
    clean_ids: list[str] | None = None,
    seconds: dict | None = None,
) -> dict:
    """``cands`` through the round's gate under each bar: {bar: verified table}. With
    ``clean_ids`` (the round's samples that are clean rows of the controlled set) also
    ``typical`` with the medians of those rows only: the bar as a clean data set would set it
    (the controlled set is half defective, which makes its own medians lax). ``seconds``: where
    to write how long the re-scoring in full took (``full``)."""
    import polars as pl

    from benchmarks.downstream import gate_stored_round
    from middo_pipeline.assets.refinement import RefineConfig
    from middo_pipeline.core.gate import round_thresholds
    from middo_pipeline.core.refine import heldout_grams
    from middo_pipeline.core.verify import verify_candidates

    cfg = RefineConfig()
    grams = heldout_grams(heldout, cfg.gate.heldout_ngram)
    t0 = time.perf_counter()
    first = gate_stored_round(store, cands, tables, settings, heldout, "flag")
    if seconds is not None:
        seconds["full"] = time.perf_counter() - t0
    scored = first.drop(["passed", "reasons"])
    # (name, bar, the rows whose medians set typical's bar: None = all of the round's, the
    # rules changed from the defaults)
    off = {"near_origin": False}
    variants = [(f"{bar}, near_origin off" if o else bar, bar, None, o) for bar in BARS for o in ({}, off)]
    if clean_ids:
        keep = pl.col("sample_id").is_in(clean_ids)
        variants += [("typical, clean medians", "typical", keep, {})]
        variants += [("typical, clean medians, near_origin off", "typical", keep, off)]
    variants += [(f"{bar}, duplicates by cosine alone", bar, None, {"duplicate_same_task": False}) for bar in BARS]
    variants += [(f"{bar}, new_task off", bar, None, {"new_task": False}) for bar in BARS]
    variants += [(f"{bar}, repair off", bar, None, {"repair": False}) for bar in BARS]
    variants += [(f"{bar}, no IFD ceiling", bar, None, {"max_ifd": None}) for bar in BARS]
    variants += [(f"{bar}, no fluency floor", bar, None, {"max_fluency_loss": None}) for bar in BARS]
    out = {}
    for name, bar, rows, changed in variants:
        loss, quality = tables["loss_signals"], tables["quality_signals"]
        if rows is not None:
            loss, quality = loss.filter(rows), quality.filter(rows)
        th = round_thresholds(loss, quality, replace(cfg.gate_rules(bar), **changed))
        # from the re-scored signals: the same rules as the gate's own pass (no forward pass)
        out[name] = verify_candidates(scored, th, heldout_grams=grams, ngram=cfg.gate.heldout_ngram)
    if not out["flag"]["passed"].equals(first["passed"]):
        raise RuntimeError("gate: re-verifying the re-scored candidates under flag disagrees with gate_round")
    return out


def cascade(cands, tables: dict, store, settings, heldout: Path, verdicts: dict, full_seconds: float) -> dict:
    """The pipeline's gate (``cascade`` on: a candidate its base-model readings reject is read
    no further) under each bar, against the same gate reading every candidate in full: the
    verdicts must be the same (else RuntimeError), and how many candidates each stage settled
    and how long each took are reported."""
    from benchmarks.downstream import gate_stored_round
    from middo_pipeline.core.gate import stage_counts

    out = {"seconds_full": round(full_seconds, 1)}
    for bar in BARS:
        t0 = time.perf_counter()
        v = gate_stored_round(store, cands, tables, settings, heldout, bar, cascade=True)
        took = time.perf_counter() - t0
        if not v["passed"].equals(verdicts[bar]["passed"]):
            raise RuntimeError(f"gate: the cascade's verdicts under {bar} differ from the full reading's")
        stages = stage_counts(v)
        out[bar] = {
            "seconds": round(took, 1),
            "saved_fraction": round(1 - took / full_seconds, 3) if full_seconds else None,
            "settled_by_stage": stages,
            "same_verdicts": True,
        }
        log(f"gate cascade [{bar}]: {took:.0f} s against {full_seconds:.0f} s in full; stages {stages}")
    return out


def run(settings, models=None) -> dict:
    import polars as pl

    from benchmarks.downstream import _one_round
    from middo_pipeline.core.storage import Storage

    s = settings
    seed_rows = load_seed_rows()
    rows = controlled.build(
        seed_rows,
        n_clean=s.det_clean,
        n_quality=s.det_quality,
        n_hard=s.det_hard,
        n_dup_clusters=0,
        dup_size=s.det_dup_size,
        n_isolated=s.det_isolated,
        seed=s.seed,
        clean_siblings=s.det_clean_siblings,
    )
    heldout = Path(__file__).resolve().parents[1] / "data" / "eval_heldout.jsonl"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="middo-bench-gate-") as tmp:
        if s.gate_keep and not s.gate_from:
            tmp = str(Path(s.gate_keep).expanduser().resolve())
            if Path(tmp).exists() and any(Path(tmp).iterdir()):
                # a loop there would run round 2 on top of the kept round 1, and this section
                # would read the old round's tables
                raise FileExistsError(
                    f"--gate-keep {tmp} is not empty: reuse its round with --gate-from {Path(tmp) / 'middo'}, "
                    "or keep the new one in another folder"
                )
            Path(tmp).mkdir(parents=True, exist_ok=True)
        if s.gate_from:
            home = Path(s.gate_from)
            log(f"gate: reusing the controlled round of {home}")
        else:
            seed_path = Path(tmp) / "controlled.jsonl"
            with seed_path.open("w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps({k: r[k] for k in ("instruction", "input", "output")}) + "\n")
            log(f"gate: one round on the controlled set ({len(rows)} rows), {s.gate_candidates} optimizer candidate(s)")
            _one_round(
                s,
                Path(tmp),
                seed_path=seed_path,
                refine={"candidates": s.gate_candidates},
                name="gate",
                heldout=heldout,
            )
            home = Path(tmp) / "middo"
        round_s = time.perf_counter() - t0
        store = Storage(home)
        names = (
            "round_dataset",
            "refinement_candidates",
            "model_readouts",
            "loss_signals",
            "quality_signals",
            "embedding_signals",
        )
        tables = {n: pl.read_parquet(store.table_path(n, "round-1")) for n in names}
        opt = tables["refinement_candidates"]
        planned = opt.filter(pl.col("candidate") == 0).select(
            "origin_id", "operation", "instruction_before", "input_before", "output_before"
        )
        known, unmatched = known_candidates(planned, rows, seed_rows, seed=s.seed)
        # the optimizer's own candidates, with the controlled row they came from
        by_key = {row_key(r["instruction"], r["input"], r["output"]): r for r in rows}
        origin = [
            by_key.get(row_key(a, b, c), {"defect": None, "kind": None})
            for a, b, c in opt.select("instruction_before", "input_before", "output_before").iter_rows()
        ]
        opt_rows = opt.with_columns(
            pl.lit("optimizer").alias("known_kind"),
            pl.Series("defect", [o["defect"] for o in origin], dtype=pl.String),
            pl.Series("defect_kind", [o["kind"] for o in origin], dtype=pl.String),
            (pl.col("candidate") + 100).alias("candidate"),
        )
        cands = pl.concat([known, opt_rows.select(known.columns)], how="diagonal_relaxed")
        log(f"gate: {cands.height} candidates to judge ({known.height} of known kind, {opt.height} the optimizer's)")
        t1 = time.perf_counter()
        clean_ids = [
            sid
            for sid, a, b, c in tables["round_dataset"]
            .select("sample_id", "instruction", "input", "output")
            .iter_rows()
            if by_key.get(row_key(a, b, c), {}).get("defect") == "none"
        ]
        took: dict = {}
        verdicts = judge(cands, tables, store, s, heldout, clean_ids=clean_ids, seconds=took)
        gate_s = time.perf_counter() - t1
        cascaded = cascade(cands, tables, store, s, heldout, verdicts, took["full"])
    flagged = planned.group_by("operation").len().sort("operation")
    out = {
        "rows": len(rows),
        "clean_rows_in_round": len(clean_ids),
        "planned_operations": dict(flagged.iter_rows()),
        "unmatched_operations": unmatched,
        "optimizer_candidates_per_sample": s.gate_candidates,
        "seconds": {"round": round_s, "gate": gate_s},
        "reused_round": str(s.gate_from) if s.gate_from else None,
        "cascade": cascaded,
    }
    for bar, v in verdicts.items():
        out[bar] = {
            "by_kind": tally(v),
            "by_kind_and_operation": tally(v, ("known_kind", "operation")),
            "by_kind_and_defect": tally(v, ("known_kind", "defect_kind")),
            "good_rejected_because": _reasons(v, "good"),
        }
    for bar in verdicts:
        bk = out[bar]["by_kind"]
        bad = [bk[k] for k in BAD_KINDS if k in bk]
        k, n = sum(b["accepted"] for b in bad), sum(b["judged"] for b in bad)
        out[bar]["bad_all"] = {"accepted": k, "judged": n, "rate": k / n if n else None, "ci": wilson(k, n)}
        g = bk.get("good", {})
        log(
            f"gate [{bar}]: good accepted {g.get('accepted')}/{g.get('judged')}, "
            f"bad accepted {k}/{n}, optimizer {bk.get('optimizer', {}).get('accepted')}/"
            f"{bk.get('optimizer', {}).get('judged')}"
        )
    return out
