"""The current-results table of ``benchmarks/README.md``, generated from ``benchmarks/results/*.json``.

    python -m benchmarks.results_table            # print the markdown table
    python -m benchmarks.results_table --write    # put it into benchmarks/README.md between the markers
    python -m benchmarks.results_table --check    # exit 1 when the README's table is not what the files give

Each headline key is read from the first results file that has it, ``quick.json`` first (the file
``--merge`` keeps current), then the others by name; a key's ``_ci95`` / ``_ci`` interval from the same
file is shown beside it, and its goal from that file's ``goals``. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"
FIRST = "quick.json"

# the headline keys, in the order of the table
HEADLINE = (
    "signal_speedup_vs_reference",
    "mfu_signal_pass",
    "knn_memory_ratio_vs_dense_100k",
    "knn_seconds_100k",
    "knn_memory_ratio_vs_dense_1m",
    "knn_seconds_1m",
    "judge_speedup_vs_generate",
    "judge_spearman_vs_generate",
    "judge_spearman_vs_generate_number_only",
    "detection_auroc",
    "quality_auroc_by_kind",
    "ingest_peak_mib_1m",
    "ingest_seconds_1m",
    "generation_speedup_vs_transformers_generate",
    "generation_default_path",
    "training_lm_head_speedup",
    "ray_overhead_at_equal_cores",
    "downstream_mc_accuracy_diff",
    "downstream_mc_accuracy_diff_ci_runs_items",
    "downstream_placebo_diff_ci_runs_items",
    "downstream_gate_off_diff",
    "downstream_gate_off_diff_ci_runs_items",
    "downstream_response_loss_improvement",
    "gate_accepts_good",
    "gate_accepts_bad",
    "closed_loop_recovery",
    "closed_loop_junk_share",
    "closed_loop_clean_vs_corrupted",
    "mc_dropout0_minus_005",
)


def load_results(folder: Path) -> list[tuple[str, dict]]:
    """(file name, content) of every results file, ``quick.json`` first, then by name."""
    paths = sorted(folder.glob("*.json"), key=lambda p: (p.name != FIRST, p.name))
    out = []
    for p in paths:
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            out.append((p.name, data))
    return out


def fmt(v) -> str:
    """A value as the table shows it: 3 significant digits, intervals in brackets."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        x = float(v)
        if not math.isfinite(x):
            return str(x)
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.3g}"
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
        return f"[{fmt(v[0])}, {fmt(v[1])}]"
    if isinstance(v, dict) and "mean" in v:
        ci = v.get("ci95")
        return fmt(v["mean"]) + (f" {fmt(ci)}" if ci else "")
    if isinstance(v, dict):
        return "; ".join(f"{k} {fmt(x)}" for k, x in v.items())
    return str(v).replace("|", "/")


def _interval(data: dict, key: str):
    for suffix in ("_ci95", "_ci"):
        if key + suffix in data:
            return data[key + suffix]
    return None


def _with_interval(value, ci) -> str:
    if isinstance(value, dict) and isinstance(ci, dict):
        return "; ".join(f"{k} {fmt(x)}" + (f" {fmt(ci[k])}" if ci.get(k) else "") for k, x in value.items())
    return fmt(value) + (f" {fmt(ci)}" if ci is not None else "")


def _goal(goals: dict, key: str) -> str:
    def one(g: dict) -> str:
        target = str(g.get("target", "")).replace(">=", "≥").replace("<=", "≤")
        return f"{target}: {'met' if g.get('met') else 'missed'}"

    if key in goals:
        return one(goals[key])
    subs = [(k.split(".", 1)[1], g) for k, g in goals.items() if k.startswith(key + ".")]
    return "; ".join(f"{name} {one(g)}" for name, g in subs)


def table(folder: Path = RESULTS) -> str:
    """The markdown table of the headline keys found in the results files."""
    files = load_results(folder)
    rows = ["| key | value [95% interval] | goal | file |", "|---|---|---|---|"]
    for key in HEADLINE:
        for name, data in files:
            if key in data:
                value = _with_interval(data[key], _interval(data, key))
                goal = _goal(data.get("goals") or {}, key)
                rows.append(f"| `{key}` | {value} | {goal} | {name} |")
                break
    return "\n".join(rows) + "\n"


def splice(readme: str, tbl: str) -> str:
    """``readme`` with ``tbl`` between the markers."""
    if START not in readme or END not in readme:
        raise ValueError(f"the README has no {START} / {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{tbl}{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.results_table", description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of results files")
    p.add_argument("--readme", type=Path, default=README, help="README holding the table between the markers")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the table into the README")
    mode.add_argument("--check", action="store_true", help="exit 1 when the README's table is stale")
    args = p.parse_args(argv)
    tbl = table(args.results)
    if not (args.write or args.check):
        sys.stdout.write(tbl)
        return 0
    text = args.readme.read_text(encoding="utf-8")
    new = splice(text, tbl)
    if args.check:
        if new != text:
            print(
                f"{args.readme}: the results table is stale; run python -m benchmarks.results_table --write",
                file=sys.stderr,
            )
            return 1
        return 0
    if new != text:
        args.readme.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
