"""``python -m benchmarks --quick | --full``: run every section, print one side-by-side table,
write ``benchmarks/results/{quick,full}.json`` (atomically)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import (
    RESULTS_DIR,
    ModelCache,
    Settings,
    environment_info,
    log,
    settings_dict,
    write_json_atomic,
)
from benchmarks.gate_oracle import BARS as GATE_BARS

SECTIONS = (
    "hardware",
    "speed",
    "training",
    "knn",
    "judge",
    "detection",
    "downstream",
    "gate",
    "closed_loop",
    "ingest",
    "generation",
    "ray",
)

# closed_loop's top-level figures (benchmarks/closed_loop.py)
CLOSED_LOOP_KEYS = (
    "closed_loop_recovery",
    "closed_loop_recovery_ci",
    "closed_loop_junk_share",
    "closed_loop_junk_accepted",
    "closed_loop_repaired_by_kind",
    "closed_loop_clean_vs_corrupted",
    "unrepaired_policy",
)

GOALS = {
    "closed_loop_recovery": (">=", 0.5, "p = 0.7: recovery >= 0.5 after round 2 (more sensitive measure)"),
    "closed_loop_junk_share": ("<=", 0.02, "junk accepted <= 2 % of the stand-in's bad answers"),
    "signal_speedup_vs_reference": (">=", 5.0, "signal pass >= 5x the reference's way"),
    "knn_memory_ratio_vs_dense_100k": (">=", 10.0, "top-k memory >= 10x below dense at 100k"),
    "knn_memory_ratio_vs_dense_1m": (">=", 10.0, "top-k memory >= 10x below dense at 1M"),
    "knn_seconds_1m": ("<=", 300.0, "top-k at 1M in under a few minutes (300 s)"),
    "judge_speedup_vs_generate": (">=", 20.0, "judge >= 20x cheaper than generate-then-parse"),
    "judge_spearman_vs_generate": (">=", 0.8, "Spearman of the two judge scores >= 0.8"),
    "detection_auroc.complexity": (">=", 0.9, "complexity AUROC vs clean >= 0.9"),
    "detection_auroc.diversity": (">=", 0.85, "diversity AUROC vs clean >= 0.85"),
    "quality_auroc_by_kind.garbled_prompt": (">=", 0.85, "quality AUROC vs clean >= 0.85 on garbled prompts"),
    "quality_auroc_by_kind.truncated_prompt": (">=", 0.85, "quality AUROC vs clean >= 0.85 on truncated prompts"),
    "quality_auroc_by_kind.unrelated_response": (">=", 0.85, "quality AUROC vs clean >= 0.85 on unrelated answers"),
    "generation_speedup_vs_transformers_generate": (
        ">=",
        5.0,
        "local generation >= 5x the tokens/s of transformers generate at batch 8, same requests",
    ),
    "ray_overhead_at_equal_cores": ("<=", 0.2, "the Ray path's signal pass at most 20% slower at equal cores"),
    "downstream_mc_accuracy_diff": (
        ">=",
        0.0,
        "gate-on data at least as good as the seed (mean MC accuracy diff >= 0)",
    ),
}


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _fmt(v, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}"
    return str(v)


def _mib(b) -> str:
    if b is None:
        return "-"
    if b >= 2**40:
        return f"{b / 2**40:.1f} TiB"
    if b >= 2**30:
        return f"{b / 2**30:.1f} GiB"
    return f"{b / 2**20:.0f} MiB"


def headline(sections: dict) -> dict:
    """The top-level figures the issue asks for, from the section blocks."""
    sp, kn, jd, de, hw = (sections.get(k) or {} for k in ("speed", "knn", "judge", "detection", "hardware"))
    k100 = _get(kn, "sizes.100000") or {}
    k1m = _get(kn, "sizes.1000000") or {}
    out = {
        "signal_speedup_vs_reference": sp.get("speedup_vs_reference"),
        "signal_speedup_vs_reference_batched_loss": sp.get("speedup_vs_reference_batched_loss"),
        "signal_samples_per_s": _get(sp, "ours.samples_per_s"),
        "reference_samples_per_s": _get(sp, "reference.samples_per_s"),
        "knn_memory_ratio_vs_dense_100k": k100.get("memory_ratio_dense_over_ours"),
        "knn_seconds_100k": _get(k100, "ours.seconds") if _get(k100, "ours.measured") else None,
        "knn_memory_ratio_vs_dense_1m": k1m.get("memory_ratio_dense_over_ours"),
        "knn_seconds_1m": _get(k1m, "ours.seconds"),
        "knn_1m_measured": bool(_get(k1m, "ours.measured")) if k1m else None,
        "judge_speedup_vs_generate": jd.get("speedup_vs_generate"),
        "judge_spearman_vs_generate": jd.get("spearman_vs_generate"),
        "judge_spearman_vs_generate_number_only": jd.get("spearman_vs_generate_number_only"),
        "mfu_signal_pass": sp.get("mfu_ours"),
        "matmul_fp32_gflops": _get(hw, "fp32.gflops"),
        "detection_auroc": de.get("detection_auroc") or {"complexity": None, "diversity": None, "quality": None},
        "detection_auroc_ci95": de.get("detection_auroc_ci95"),
        "quality_auroc_by_kind": de.get("quality_auroc_by_kind"),
        "quality_auroc_by_kind_ci95": de.get("quality_auroc_by_kind_ci95"),
        "ingest_peak_mib_1m": (sections.get("ingest") or {}).get("ingest_peak_mib_1m"),
        "ingest_seconds_1m": (sections.get("ingest") or {}).get("ingest_seconds_1m"),
        "generation_speedup_vs_transformers_generate": (sections.get("generation") or {}).get(
            "speedup_vs_transformers_generate"
        ),
        "generation_default_path": (sections.get("generation") or {}).get("default_path"),
        "ray_overhead_at_equal_cores": (sections.get("ray") or {}).get("ray_overhead_at_equal_cores"),
        "training_lm_head_speedup": (sections.get("training") or {}).get("speedup"),
    }
    down = sections.get("downstream") or {}
    for key in (
        "downstream_mc_accuracy_diff",
        "downstream_mc_accuracy_diff_ci",
        "downstream_mc_accuracy_diff_ci_runs_items",
        "downstream_placebo_diff_ci_runs_items",
        "downstream_gate_off_diff",
        "downstream_gate_off_diff_ci",
        "downstream_gate_off_diff_ci_runs_items",
        "downstream_by_operation",
    ):
        out[key] = down.get(key) if down and not down.get("skipped") else None
    loop = sections.get("closed_loop") or {}
    for key in CLOSED_LOOP_KEYS:
        out[key] = loop.get(key) if loop and not loop.get("skipped") else None
    gate = sections.get("gate") or {}
    measured = gate and not gate.get("skipped") and not gate.get("error")
    # the gate on candidates of known kind: share of good refinements accepted, of bad ones let in
    for key, path in (("gate_accepts_good", "by_kind.good"), ("gate_accepts_bad", "bad_all")):
        out[key] = {bar: _get(gate.get(bar) or {}, f"{path}.rate") for bar in GATE_BARS} if measured else None
        out[f"{key}_ci"] = {bar: _get(gate.get(bar) or {}, f"{path}.ci") for bar in GATE_BARS} if measured else None
    return out


def goals(head: dict) -> dict:
    res = {}
    for key, (op, target, text) in GOALS.items():
        v = _get(head, key)
        met = None if v is None else (v >= target if op == ">=" else v <= target)
        res[key] = {"goal": text, "target": f"{op} {target:g}", "value": v, "met": met}
    return res


def table(sections: dict, head: dict, gl: dict) -> str:
    rows: list[tuple[str, str, str, str, str]] = []  # figure, ours, reference/bound, ratio, goal
    sp = sections.get("speed") or {}
    if sp and "ours" in sp:
        rows.append(
            (
                "signal pass, samples/s",
                _fmt(sp["ours"]["samples_per_s"]),
                _fmt(sp["reference"]["samples_per_s"]) + " (1-by-1)",
                _fmt(sp["speedup_vs_reference"]) + "x",
                _goal(gl, "signal_speedup_vs_reference"),
            )
        )
        rows.append(
            (
                "  vs reference w/ batched loss",
                "",
                _fmt(sp["reference_batched_loss"]["samples_per_s"]),
                _fmt(sp["speedup_vs_reference_batched_loss"]) + "x",
                "",
            )
        )
        if sp.get("mfu_ours") is not None:
            rows.append(
                (
                    "signal pass, achieved GFLOP/s",
                    _fmt(sp["ours"]["achieved_gflops"], 1),
                    _fmt(sp["peak_gflops"], 1) + " (matmul peak)",
                    f"MFU {100 * sp['mfu_ours']:.1f}%",
                    f"ref MFU {100 * sp['mfu_reference']:.1f}%",
                )
            )
    kn = sections.get("knn") or {}
    kk = kn.get("k", 2)

    def knn_cell(o: dict) -> str:
        if o.get("seconds") is None and o.get("error"):
            return o["error"][:40]
        cell = f"{_fmt(o.get('seconds'), 1)} s, {_mib(o.get('peak_bytes'))}" + (
            "" if o.get("measured") else " (extrap.)"
        )
        return cell + (f" [{o['method']}]" if o.get("method") in ("exact", "approx") else "")

    for n, e in (kn.get("sizes") or {}).items():
        o, d = e["ours"], e["dense"]
        ours = knn_cell(o)
        dense = (
            f"{_fmt(d.get('seconds'), 1)} s, {_mib(d.get('peak_bytes'))}"
            if d.get("measured")
            else f"{_mib(d.get('peak_bytes'))} (computed)"
        )
        ratio = e.get("memory_ratio_dense_over_ours")
        g = {
            "100000": _goal(gl, "knn_memory_ratio_vs_dense_100k"),
            "1000000": _goal(gl, "knn_memory_ratio_vs_dense_1m"),
        }.get(n, "")
        if n == "1000000":
            g = (g + "; " + _goal(gl, "knn_seconds_1m")).strip("; ")
        rows.append((f"top-{kk} at N={int(n):,}", ours, dense, f"mem {_fmt(ratio, 1)}x", g))
        other = e.get("ours_approx") if o.get("method") == "exact" else e.get("ours_exact")
        if other:  # the method auto did not pick at this size, and approx's recall
            a = o if o.get("method") == "approx" else other
            rec = f"recall@{kk} {_fmt(a.get('recall_at_k'), 3)} (random)" if a.get("recall_at_k") is not None else ""
            sp = e.get("speedup_approx_vs_exact")
            rows.append(
                (
                    f"  {other.get('method', '')} at N={int(n):,}",
                    knn_cell(other),
                    rec,
                    f"approx speedup {_fmt(sp, 1)}x" if sp else "",
                    "",
                )
            )
    cl = kn.get("clustered") or {}
    if cl.get("recall_at_k") is not None:
        rows.append(
            (
                f"  approx, clustered N={cl['n']:,}",
                knn_cell(cl),
                f"recall@{kk} {_fmt(cl['recall_at_k'], 3)} (clustered)",
                "",
                "",
            )
        )
    jd = sections.get("judge") or {}
    if jd and "expected" in jd:
        rows.append(
            (
                "quality judge, s/sample",
                _fmt(jd["expected"]["seconds_per_sample"], 3),
                _fmt(jd["generate"]["seconds_per_sample"], 3) + f" (gen {jd['max_new_tokens']} tok)",
                _fmt(jd["speedup_vs_generate"], 1) + "x",
                _goal(gl, "judge_speedup_vs_generate"),
            )
        )
        rows.append(
            (
                "  Spearman expected vs generated",
                _fmt(jd.get("spearman_vs_generate")),
                "",
                f"parsed {100 * (jd['generate'].get('parsed_fraction') or 0):.0f}%",
                _goal(gl, "judge_spearman_vs_generate"),
            )
        )
        if "generate_number_only" in jd:
            g = jd["generate_number_only"]
            rows.append(
                (
                    "  vs number-only generation",
                    _fmt(jd.get("spearman_vs_generate_number_only")),
                    _fmt(g["seconds_per_sample"], 3) + " s/sample",
                    f"parsed {100 * g['parsed_fraction']:.0f}%",
                    "",
                )
            )
    de = sections.get("detection") or {}
    ci = de.get("detection_auroc_ci95") or {}
    for sig in ("complexity", "diversity", "quality"):
        if sig in de:
            b = de[sig]
            c = ci.get(sig) or [None, None]
            rows.append(
                (
                    f"detect {sig}: AUROC vs clean",
                    _fmt((de.get("detection_auroc") or {}).get(sig)),
                    f"95% CI {_fmt(c[0])}-{_fmt(c[1])}; P {_fmt(b.get('precision'))} / R {_fmt(b.get('recall'))} at m=1",
                    f"vs all {_fmt(b.get('auroc'))}",
                    _goal(gl, f"detection_auroc.{sig}"),
                )
            )
    kci = de.get("quality_auroc_by_kind_ci95") or {}
    for kind, v in (de.get("quality_auroc_by_kind") or {}).items():
        c = kci.get(kind) or [None, None]
        rows.append(
            (
                f"  quality {kind}",
                _fmt(v),
                f"95% CI {_fmt(c[0])}-{_fmt(c[1])}",
                "",
                _goal(gl, f"quality_auroc_by_kind.{kind}"),
            )
        )
    gn = sections.get("generation") or {}
    shown_default = gn.get("default_path_measured_as") or gn.get("default_path")
    for name, g in (gn.get("paths") or {}).items():
        if "tokens_per_s" not in g:
            rows.append((f"generation {name}", "error", g.get("error", "")[:40], "", ""))
            continue
        bound = g.get("fraction_of_bound")
        agree = g.get("agreement_with_baseline")
        rows.append(
            (
                f"generation {name}" + (" (default)" if name == shown_default else ""),
                f"{_fmt(g['tokens_per_s'], 1)} tok/s, {_fmt(g['seconds_per_request'])} s/req",
                ("" if bound is None else f"{100 * bound:.0f}% of bound; ")
                + ("" if agree is None else f"agree {100 * agree:.0f}%"),
                _fmt(g.get("speedup")) + "x",
                _goal(gl, "generation_speedup_vs_transformers_generate") if name == shown_default else "",
            )
        )
    mb = gn.get("decode_matmul_bound") or {}
    if mb.get("tokens_per_s"):
        frac = gn.get("default_fraction_of_decode_matmul_bound")
        rows.append(
            (
                f"  linear layers alone at {mb['rows']} live rows",
                f"{_fmt(mb['tokens_per_s'], 1)} tok/s",
                f"{_fmt(mb['step_seconds'])} s/step",
                "" if frac is None else f"default at {100 * frac:.0f}%",
                "",
            )
        )
    tr = sections.get("training") or {}
    if tr.get("speedup") is not None:
        rows.append(
            (
                "training step, LM head at response positions",
                f"{_fmt(tr['response_positions']['seconds_per_step'])} s/step",
                f"{_fmt(tr['every_position']['seconds_per_step'])} s/step (every position)",
                _fmt(tr["speedup"]) + "x",
                "weights identical"
                if tr.get("lora_weights_identical")
                else f"|loss diff| {tr['max_abs_loss_diff']:.0e}",
            )
        )
    elif tr:
        rows.append(_not_measured_row("training", tr))
    ry = sections.get("ray") or {}
    if ry.get("one_process"):
        one = ry["one_process"]
        rows.append(
            ("ray: one process", f"{_fmt(one['samples_per_second'], 1)} samples/s", f"{one['threads']} threads", "", "")
        )
        for r in (ry.get("ray") or {}).values():
            rows.append(
                (
                    f"ray: {r['workers']} worker(s) x {r['threads_per_worker']} thread(s)",
                    f"{_fmt(r['samples_per_second'], 1)} samples/s",
                    f"start-up {_fmt(r['startup_seconds'], 1)} s; |loss diff| {r['max_abs_loss_diff']:.0e}",
                    f"{100 * r['overhead_vs_one_process']:+.0f}%",
                    _goal(gl, "ray_overhead_at_equal_cores")
                    if r["overhead_vs_one_process"] == ry.get("ray_overhead_at_equal_cores")
                    else "",
                )
            )
    elif ry:
        rows.append(_not_measured_row("ray", ry))
    dn = sections.get("downstream") or {}
    if dn:
        if dn.get("skipped"):
            rows.append(("downstream (seed vs round 1)", "skipped", dn.get("reason", "")[:40], "", ""))
        elif "variants" in dn:
            for key, v in dn["variants"].items():
                d = v.get("mc_accuracy_diff_vs_seed") or {}
                c = d.get("ci95") or [None, None]
                cr = (v.get("mc_accuracy_diff_vs_seed_runs_items") or {}).get("ci95") or [None, None]
                rows.append(
                    (
                        f"downstream {key}: MC acc",
                        _fmt(v["mc_accuracy_mean"], 3),
                        f"{v['rows']} rows",
                        f"diff {_fmt(d.get('mean'), 3)} items [{_fmt(c[0], 3)}, {_fmt(c[1], 3)}] "
                        f"runs+items [{_fmt(cr[0], 3)}, {_fmt(cr[1], 3)}]"
                        if d
                        else "",
                        _goal(gl, "downstream_mc_accuracy_diff") if key == "gate_on" else "",
                    )
                )
            for key, v in dn["variants"].items():
                rb = v.get("rollback")
                if not rb:
                    continue
                sub = rb.get("pipeline_eval") or {}
                rules = rb.get("rules") or {}
                rows.append(
                    (
                        f"downstream {key}: rollback fires",
                        f"{rb['fired']}/{rb['of']} seeds",
                        f"{sub['fired']}/{rb['of']} on {sub['items']} items" if sub else "",
                        " ".join(f"{k} {n}" for k, n in rules.items()),
                        "",
                    )
                )
            null = dn.get("rollback_null") or {}
            if null.get("pairs"):

                def pct(x: dict) -> str:
                    return f"{100 * x['rate']:.1f}% [{100 * x['ci95'][0]:.1f}, {100 * x['ci95'][1]:.1f}]"

                sub = (null.get("pipeline_eval") or {}).get("rules") or {}
                rows.append(
                    (
                        "downstream: rollback with unchanged data",
                        f"{pct(null['rules']['pipeline'])} of {null['pairs']} pairs",
                        f"{pct(sub['pipeline'])} on {null['pipeline_eval']['items']} items" if sub else "",
                        f"significance alone {pct(null['rules']['either'])} ({null['runs']} runs of the same rows)",
                        "",
                    )
                )
            db = (dn.get("loop") or {}).get("default_bar")
            if db:
                rows.append(
                    (
                        f"downstream: default bar ({db['bar']}) accepts",
                        f"{db['accepted']} refinements",
                        f"{db['candidates_passed']} candidates pass it",
                        "data = the seed's" if db["accepted"] == 0 else "",
                        "",
                    )
                )
    gt = sections.get("gate") or {}
    if gt.get("skipped"):
        rows.append(("gate (known candidates)", "skipped", gt.get("reason", "")[:40], "", ""))
    elif "flag" in gt:
        for bar in GATE_BARS:
            for kind, v in gt[bar]["by_kind"].items():
                ci = v.get("ci") or [None, None]
                rows.append(
                    (
                        f"gate [{bar}] accepts {kind}",
                        f"{v['accepted']}/{v['judged']}",
                        f"[{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}]",
                        "",
                        "",
                    )
                )
    for name, blk in sections.items():
        if isinstance(blk, dict) and blk.get("error"):
            rows.append((f"{name}: FAILED", blk["error"][:60], "", "", ""))
    head_row = ("figure", "ours", "reference / bound", "ratio", "goal")
    widths = [max(len(r[i]) for r in rows + [head_row]) for i in range(5)]

    def line(r) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(head_row), sep, *(line(r) for r in rows)])


def _not_measured_row(name: str, block: dict) -> tuple[str, str, str, str, str]:
    """The table row of a section that was skipped or failed: why, in 40 characters."""
    return (
        name,
        "skipped" if block.get("skipped") else "error",
        (block.get("reason") or block.get("error") or "")[:40],
        "",
        "",
    )


def _goal(gl: dict, key: str) -> str:
    g = gl.get(key)
    if not g:
        return ""
    mark = {True: "met", False: "MISSED", None: "n/a"}[g["met"]]
    return f"{g['target']}: {mark}"


def merge_results(path: Path, sections: dict, runs: dict, imports: list[str], error) -> tuple[dict, dict]:
    """The sections already in ``path`` (with when and how each was measured), then the
    imported ones, then those run now: each section keeps the run it came from, so ratios
    stay within one run while the file holds the latest figure of every section."""
    old = json.loads(path.read_text()) if path.exists() else {}
    merged = dict(old.get("sections") or {})
    merged_runs = dict(old.get("section_runs") or {})
    for name in merged:
        merged_runs.setdefault(name, {"date": "unknown (before section_runs)", "environment": old.get("environment")})
    for spec in imports:
        name, sep, file = spec.partition("=")
        if not sep or name not in SECTIONS:
            error(f"--import wants SECTION=FILE with SECTION one of {', '.join(SECTIONS)}: {spec!r}")
        src = json.loads(Path(file).read_text())
        if "sections" in src:
            if name not in src["sections"]:
                error(f"--import {spec}: {file} has no section {name!r} (it has {sorted(src['sections'])})")
            block = src["sections"][name]
            run = (src.get("section_runs") or {}).get(name) or {
                "seconds": (src.get("section_seconds") or {}).get(name),
                "environment": src.get("environment"),
            }
        else:
            block, run = src, {k: src[k] for k in ("date", "command") if k in src}
        merged[name] = block
        merged_runs[name] = {"imported_from": file, **run}
    for name, block in sections.items():
        # a section this run only skipped (downstream, gate without --only) keeps its last measurement
        if isinstance(block, dict) and block.get("skipped") and isinstance(merged.get(name), dict):
            if not merged[name].get("skipped"):
                continue
        merged[name] = block
        if name in runs:
            merged_runs[name] = runs[name]
    order = [n for n in SECTIONS if n in merged]
    return {n: merged[n] for n in order}, {n: merged_runs[n] for n in order if n in merged_runs}


def with_dependencies(only: list[str]) -> list[str]:
    """The sections to run, with ``hardware`` added when a section that reports a fraction of the
    machine's bound (speed: MFU; generation: % of bound) runs: that bound must come from the same
    machine and run, never from an earlier one kept in a merged file."""
    if {"speed", "generation"} & set(only) and "hardware" not in only:
        log("=== hardware added: speed and generation report fractions of this run's measured matmul peak")
        return ["hardware", *only]
    return only


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--quick",
        action="store_true",
        help="a few minutes on 2 CPU cores: small sizes, 1M top-k approx measured (exact extrapolated), no downstream",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="everything at full size (meant for a GPU): 1M top-k measured, downstream over 3 seeds",
    )
    p.add_argument("--only", default=None, help=f"comma-separated sections to run (default all): {','.join(SECTIONS)}")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--model",
        default=None,
        help="model to benchmark (default: the packaged SmolLM2-135M-Instruct; 'tiny-llama' smoke-tests the harness in seconds)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--gate-from",
        default=None,
        metavar="MIDDO_HOME",
        help="gate: reuse the round-1 of the controlled set kept from an earlier run (--gate-keep) instead of running it",
    )
    p.add_argument(
        "--gate-keep",
        default=None,
        metavar="DIR",
        help="gate: run the controlled round in DIR and keep it (DIR/middo is then a --gate-from)",
    )
    p.add_argument(
        "--downstream-from",
        default=None,
        metavar="MIDDO_HOME",
        help="downstream: reuse the round-1 candidates of a finished loop (e.g. .dagster_home/middo) instead of running a round",
    )
    p.add_argument(
        "--no-regate",
        action="store_true",
        help="downstream with --downstream-from: keep the stored gate verdicts instead of re-verifying the candidates "
        "with this version's gate",
    )
    p.add_argument(
        "--no-run-cache",
        action="store_true",
        help="downstream: train every run again (by default a run identical in data, training config, model and "
        "held-out set reuses its per-item results from ~/.cache/middo-pipeline/bench-downstream)",
    )
    p.add_argument(
        "--downstream-partial",
        default=None,
        help="downstream: JSON written after every training run (seed, gate on/off first), so a stopped run keeps its figures",
    )
    p.add_argument(
        "--variants",
        default=None,
        help="downstream: comma-separated datasets to train on (default all): "
        "seed,gate_on,gate_off,seed_reshuffled,simplify_only,rewrite_only,extend_only "
        "(seed is always included: the baseline; seed_reshuffled is the placebo)",
    )
    p.add_argument("--seeds", default=None, help="downstream: comma-separated training seeds (default 0,1,2,3,4)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/{quick,full}.json)")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other sections already in --out and replace only those run (or imported) now; headline "
        "and goals are recomputed from all of them, and section_runs says when and how each was measured. "
        "Implied by --only when --out is the default results file: a partial run never replaces it",
    )
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="SECTION=FILE",
        help="with --merge: take SECTION from FILE, a results file of an earlier run (its sections.SECTION) or one "
        "section's own JSON; repeatable. Without --only, no section runs",
    )
    args = p.parse_args(argv)

    over = {"device": args.device, "threads": args.threads}
    if args.model:
        over["model"] = args.model
    if args.downstream_from:
        over["down_from"] = args.downstream_from
    if args.gate_from:
        over["gate_from"] = args.gate_from
    if args.gate_keep:
        over["gate_keep"] = args.gate_keep
    if args.variants:
        from benchmarks.downstream import VARIANTS

        names = tuple(dict.fromkeys(["seed"] + [v.strip() for v in args.variants.split(",") if v.strip()]))
        if set(names) - set(VARIANTS):
            p.error(f"unknown --variants {sorted(set(names) - set(VARIANTS))}; known: {', '.join(VARIANTS)}")
        over["down_variants"] = names
        over["down_equal_steps"] = tuple(v for v in ("gate_on",) if v in names)
    if args.no_run_cache:
        over["down_run_cache"] = None
    if args.no_regate:
        over["down_regate"] = False
    if args.downstream_partial:
        over["down_partial"] = args.downstream_partial
    if args.seeds:
        over["down_seeds"] = tuple(int(x) for x in args.seeds.split(","))
    settings = (Settings.quick if args.quick else Settings.full)(**over)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.imports and not args.merge:
        p.error("--import needs --merge")
    only = [s.strip() for s in args.only.split(",")] if args.only else ([] if args.imports else list(SECTIONS))
    unknown = set(only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    only = with_dependencies(only)
    out_path = args.out or str(RESULTS_DIR / f"{settings.mode}.json")
    if args.only and not args.out and not args.merge and Path(out_path).exists():
        # the default results file keeps every section's latest run: some sections alone must not wipe the rest
        log(f"--only into the default results file: merging into {out_path} (the other sections are kept)")
        args.merge = True

    t_all = time.perf_counter()
    env = environment_info()
    models = ModelCache(settings)
    sections: dict = {}
    seconds: dict = {}

    def section(name: str, fn):
        if name not in only:
            return
        log(f"=== {name}")
        t0 = time.perf_counter()
        try:
            sections[name] = fn()
        except Exception as exc:  # one failed section must not lose the others
            traceback.print_exc()
            sections[name] = {"error": f"{type(exc).__name__}: {exc}"}
        seconds[name] = time.perf_counter() - t0
        log(f"=== {name} done in {seconds[name]:.1f}s")

    from benchmarks import (
        closed_loop,
        detection,
        downstream,
        gate_oracle,
        generation,
        hardware,
        ingest,
        judge,
        knn,
        ray_bench,
        speed,
        training_bench,
    )

    section("hardware", lambda: hardware.run(settings, models))
    section(
        "speed",
        lambda: speed.run(
            settings, models, sections.get("hardware") if "fp32" in (sections.get("hardware") or {}) else None
        ),
    )
    section("training", lambda: training_bench.run(settings, models))
    section("knn", lambda: knn.run(settings))
    section("detection", lambda: detection.run(settings, models, with_judge="judge" in only))
    if isinstance(sections.get("detection"), dict) and "judge" in sections["detection"]:
        sections["judge"] = sections["detection"].pop("judge")  # measured inside detection
    elif "judge" in only:
        section("judge", lambda: judge.run(settings, models))

    def whole_round(name: str, fn, why: str):
        """A section that runs a whole Middo round: only with --full or when named in --only."""
        if settings.downstream or (args.only and name in only):
            section(name, fn)
        elif name in only:
            sections[name] = {"skipped": True, "reason": f"--quick: {why}; --only {name} or --full"}

    whole_round(
        "downstream",
        lambda: downstream.run(settings, models),
        "dozens of training runs do not fit in minutes",
    )
    whole_round(
        "gate",
        lambda: gate_oracle.run(settings, models),
        "a whole round on the controlled set (about 20 minutes)",
    )
    whole_round(
        "closed_loop",
        lambda: closed_loop.run(settings, seeds=settings.down_seeds),
        "several three-round loops and dozens of training runs (hours on 2 cores)",
    )

    section("ingest", lambda: ingest.run(settings))  # 1M rows in a child process (about 30 s, 1.5 GB today)
    section(
        "generation",
        lambda: generation.run(
            settings, models, sections.get("hardware") if "fp32" in (sections.get("hardware") or {}) else None
        ),
    )

    section("ray", lambda: ray_bench.run(settings, models))

    wall = time.perf_counter() - t_all
    runs = {
        name: {
            "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "command": " ".join(sys.argv),
            "seconds": seconds.get(name),
            "environment": env,
        }
        for name in sections
    }
    if args.merge:
        sections, runs = merge_results(Path(out_path), sections, runs, args.imports, p.error)
    head = headline(sections)
    gl = goals(head)
    result = {
        "mode": settings.mode,
        **head,
        "goals": gl,
        "wall_seconds": wall,
        "section_seconds": seconds,
        "section_runs": runs,
        "model_load_seconds": models.load_seconds,
        "environment": env,
        "settings": settings_dict(settings),
        "sections": sections,
    }
    write_json_atomic(Path(out_path), result)
    print()
    print(
        f"middo-pipeline benchmarks ({settings.mode}) on {env['platform']}, {env['torch_threads']} torch threads"
        + (f", {env['cuda']}" if env.get("cuda") else ", CPU")
    )
    print(table(sections, head, gl))
    print(f"wall time {wall:.0f}s; results in {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
