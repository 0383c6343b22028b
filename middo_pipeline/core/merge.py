"""Step 4 of the loop: D_{r+1} = (D_r - replaced) + simplified + rewritten + extended.

Unlike the reference (a set intersection on instruction/output that loses the order and drops
duplicates silently), the merge here

- keeps the input's row order: a replacement takes its original's place, an extension comes
  right after its origin;
- stamps provenance on every row: ``round``; ``operation`` = ``kept`` for an unchanged row
  (``origin_id`` = its own id) or the optimizer operation for a new row (``origin_id`` = the
  flagged sample it came from);
- never loses a sample: a flagged sample whose replacement failed stays, as ``kept``, unless
  the merge is asked to quarantine it (``quarantine``: ``unrepaired_ids``); then it leaves the
  data but is kept, with its reason, in ``MergeResult.quarantined``;
- records every row it does not take: exact duplicates (same ``sample_id``, i.e. the same
  normalized text) in ``duplicates`` with the row they duplicate, extensions cut by the size
  policy in ``counts`` and ``accounting``;
- accounts for every input sample in ``accounting``.

Rollback: ``core.rollback``.

Duplicates: the input rows have priority, then replacements, then extensions. A replacement
identical to an input sample (or to an earlier replacement) is removed and its original is
*kept* (fate ``kept_duplicate``): a replacement that only repeats existing data replaces
nothing. An extension identical to an input sample, a replacement or an earlier extension is
removed.

Size policy: ``grow`` adds every extension (the reference's behaviour, ~+11 % on Alpaca);
``keep`` lets the output exceed the input by at most ``max_growth`` (a fraction) and, when
extensions would exceed that, keeps the extensions of the sparsest samples first
(``sparse_order``: origin ids from sparsest to least sparse; origins missing from it come
last, in input order).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal, get_args

import polars as pl

from middo_pipeline.core.schema import EXTENDED, KEPT, REWRITTEN, SAMPLE_SCHEMA, SIMPLIFIED

Unrepaired = Literal["keep", "quarantine"]
UNREPAIRED_POLICIES: tuple[str, ...] = get_args(Unrepaired)
QUARANTINED = "quarantined"  # fate of an unrepaired sample the merge took out of the data
DEFAULT_UNREPAIRED: Unrepaired = "keep"
UNREPAIRED_TABLE = "unrepaired_samples"  # per round: the samples the merge quarantined, with why
SizePolicy = Literal["grow", "keep"]
SIZE_POLICIES: tuple[str, ...] = get_args(SizePolicy)
DEFAULT_SIZE_POLICY: SizePolicy = "keep"  # the pipeline's (MergeConfig) and this module's default
DEFAULT_MAX_GROWTH = 0.15
_REPLACING = (SIMPLIFIED, REWRITTEN)
_REFINED_COLUMNS = (
    "origin_id",
    "operation",
    "instruction_after",
    "input_after",
    "output_after",
    "new_sample_id",
    "status",
    "failure_reason",
)

ACCOUNTING_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String,
    # kept | replaced | kept_failed | kept_duplicate | quarantined, with "+extended" when an extension
    # was added; withdrawn (rollback_round: a row the round before had made, taken out again)
    "fate": pl.String,
    "replacement_operation": pl.String,  # simplified | rewritten | null (none attempted); withdrawn: its operation
    "replacement_status": pl.String,  # ok | failed | duplicate | null; withdrawn: rolled_back
    # the new row's id when replaced (or the duplicate's id); withdrawn: the original restored (null for an extension)
    "replacement_id": pl.String,
    "extension_status": pl.String,  # added | failed | duplicate | dropped_by_size_policy | null
    "extension_id": pl.String,  # the extension's id (added, duplicate or dropped)
    "failure_reason": pl.String,  # "<operation>: <reason>" for failed operations, "; "-joined
}

DUPLICATES_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String,
    "operation": pl.String,  # of the removed row
    "origin_id": pl.String,  # of the removed row
    "instruction": pl.String,
    "input": pl.String,
    "output": pl.String,
    "duplicate_of_operation": pl.String,  # the row it repeats: "input" (an input sample) or an operation
    "duplicate_of_origin_id": pl.String,  # the repeated row's origin (its own id for an input sample)
}


UNREPAIRED_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.String,
    "instruction": pl.String,
    "input": pl.String,
    "output": pl.String,
    "round": pl.Int64,  # the round that quarantined it
    "origin_id": pl.String,  # its own id (the provenance columns of an export)
    "operation": pl.String,  # the replacement that was tried (simplified | rewritten)
    "reason": pl.String,  # why no candidate was accepted
}


def unrepaired_ids(refined: pl.DataFrame) -> set[str]:
    """The samples whose replacement the gate judged and refused (status ``rejected``): the
    optimizer answered, and no answer fixed the sample. A call that failed (a server error, an
    unparseable answer, the prompt returned as it was) says nothing against the sample."""
    rows = refined.filter(pl.col("operation").is_in(list(_REPLACING)) & (pl.col("status") == "rejected"))
    return set(rows["origin_id"].to_list())


@dataclass
class MergeResult:
    dataset: pl.DataFrame  # canonical SAMPLE_SCHEMA table, D_{r+1}
    accounting: pl.DataFrame  # ACCOUNTING_SCHEMA: one row per input sample
    counts: dict  # JSON-serializable summary
    # DUPLICATES_SCHEMA: the rows removed as exact duplicates, with the row each repeats (the
    # optimized_dataset asset stores it beside its artifacts)
    duplicates: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=DUPLICATES_SCHEMA))
    # UNREPAIRED_SCHEMA: the samples taken out of the data as unrepaired (quarantine), with why
    quarantined: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=UNREPAIRED_SCHEMA))


def _validate(samples: pl.DataFrame, refined: pl.DataFrame) -> None:
    missing = [c for c in _REFINED_COLUMNS if c not in refined.columns]
    if missing:
        raise ValueError(f"refined table lacks columns {missing}")
    ids = samples["sample_id"].to_list()
    if len(ids) != len(set(ids)):
        raise ValueError("the round's samples have duplicate sample_id values; fix the input table first")
    bad_ops = set(refined["operation"].to_list()) - {SIMPLIFIED, REWRITTEN, EXTENDED}
    if bad_ops:
        raise ValueError(f"refined table has unknown operations {sorted(bad_ops)}")
    unknown = set(refined["origin_id"].to_list()) - set(ids)
    if unknown:
        raise ValueError(f"refined rows refer to {len(unknown)} samples not in the input, e.g. {sorted(unknown)[:3]}")
    kinds = refined.select("origin_id", pl.col("operation").replace({SIMPLIFIED: "replace", REWRITTEN: "replace"}))
    if kinds.height != kinds.unique().height:
        raise ValueError("refined table has more than one replacement or extension for the same sample")
    ok = refined.filter(pl.col("status") == "ok")
    if ok.filter(
        pl.col("new_sample_id").is_null() | pl.col("instruction_after").is_null() | pl.col("output_after").is_null()
    ).height:
        raise ValueError("refined rows with status 'ok' must have new_sample_id, instruction_after and output_after")


@dataclass
class _Ledger:
    """What the merge phases share: which output id is taken by which row, the rows removed as
    duplicates, the failures by reason, and the accounting row of every input sample."""

    owner: dict[str, tuple[str, str]]  # output id -> (operation, origin id); input rows: ("input", own id)
    acc: dict[str, dict] = field(default_factory=dict)
    duplicates: list[dict] = field(default_factory=list)
    failures: Counter = field(default_factory=Counter)

    def take(self, row: dict, operation: str, origin: str) -> bool:
        """Claim ``row``'s id for it; False (and the row recorded as a duplicate) when taken."""
        sid = row["sample_id"]
        if sid in self.owner:
            dup_op, dup_origin = self.owner[sid]
            self.duplicates.append({**row, "duplicate_of_operation": dup_op, "duplicate_of_origin_id": dup_origin})
            return False
        self.owner[sid] = (operation, origin)
        return True


def merge_round(
    samples: pl.DataFrame,
    refined: pl.DataFrame,
    *,
    round_number: int,
    size_policy: SizePolicy = DEFAULT_SIZE_POLICY,
    max_growth: float = DEFAULT_MAX_GROWTH,
    sparse_order: list[str] | None = None,
    quarantine: Collection[str] = (),
) -> MergeResult:
    """Build D_{r+1} from D_r (``samples``) and the round's ``refined_samples``; every row gets
    ``round_number`` (r). Samples in ``quarantine`` whose replacement was not accepted leave the
    data (fate ``quarantined``; ``MergeResult.quarantined``)."""
    if size_policy not in SIZE_POLICIES:
        raise ValueError(f"size_policy must be one of {SIZE_POLICIES}, got {size_policy!r}")
    if size_policy == "keep" and not max_growth >= 0:
        raise ValueError(f"max_growth must be >= 0, got {max_growth!r}")
    _validate(samples, refined)

    input_rows = list(samples.select("sample_id", "instruction", "input", "output").iter_rows(named=True))
    replacement: dict[str, dict] = {}
    extension: dict[str, dict] = {}
    for r in refined.iter_rows(named=True):
        (replacement if r["operation"] in _REPLACING else extension)[r["origin_id"]] = r
    ledger = _Ledger(owner={r["sample_id"]: ("input", r["sample_id"]) for r in input_rows})

    base = _base_rows(input_rows, replacement, ledger, set(quarantine))
    candidates = _extension_candidates(input_rows, extension, ledger)
    n_base = sum(row is not None for row in base)
    allowed, dropped, cap = _size_policy(input_rows, n_base, candidates, size_policy, max_growth, sparse_order)
    for sid in dropped:
        ledger.acc[sid]["extension_status"] = "dropped_by_size_policy"
    for sid in allowed:
        ledger.acc[sid]["extension_status"] = "added"

    # assemble in order: base rows (replacements in place), each extension right after its origin
    out_rows: list[dict] = []
    quarantined = []
    for src, row in zip(input_rows, base):
        if row is None:
            rep = replacement[src["sample_id"]]
            quarantined.append(
                {
                    **src,
                    "round": round_number,
                    "origin_id": src["sample_id"],
                    "operation": rep["operation"],
                    "reason": rep["failure_reason"],
                }
            )
        else:
            out_rows.append(row)
        if src["sample_id"] in allowed:
            out_rows.append(candidates[src["sample_id"]])
    dataset = pl.DataFrame([{**r, "round": round_number} for r in out_rows], schema=SAMPLE_SCHEMA)

    acc_rows = []
    for src in input_rows:
        a = ledger.acc[src["sample_id"]]
        primary = a.pop("primary")
        a["fate"] = primary + ("+extended" if a["extension_status"] == "added" else "")
        acc_rows.append(a)
    accounting = pl.DataFrame(acc_rows, schema=ACCOUNTING_SCHEMA)
    counts = _counts(input_rows, refined, dataset, accounting, ledger, len(dropped), size_policy, max_growth, cap)
    return MergeResult(
        dataset=dataset,
        accounting=accounting,
        counts=counts,
        duplicates=pl.DataFrame(ledger.duplicates, schema=DUPLICATES_SCHEMA),
        quarantined=pl.DataFrame(quarantined, schema=UNREPAIRED_SCHEMA),
    )


WITHDRAWN = "withdrawn"  # fate of a row a rollback took out again (core.rollback)


def _new_row(r: dict) -> dict:
    """A refined row as an output row."""
    return {
        "sample_id": r["new_sample_id"],
        "instruction": r["instruction_after"],
        "input": r["input_after"] or "",
        "output": r["output_after"],
        "origin_id": r["origin_id"],
        "operation": r["operation"],
    }


def _base_rows(
    input_rows: list[dict], replacement: dict[str, dict], ledger: _Ledger, quarantine: set[str]
) -> list[dict | None]:
    """Phase 1: each input sample or its replacement, in input order (one row per input sample;
    None for a sample quarantined); opens every sample's accounting row."""
    base: list[dict] = []
    for src in input_rows:
        sid = src["sample_id"]
        a = {
            "sample_id": sid,
            "replacement_operation": None,
            "replacement_status": None,
            "replacement_id": None,
            "extension_status": None,
            "extension_id": None,
            "failure_reason": None,
            "primary": "kept",
        }
        ledger.acc[sid] = a
        kept = {**src, "origin_id": sid, "operation": KEPT}
        rep = replacement.get(sid)
        if rep is None:
            base.append(kept)
            continue
        a["replacement_operation"] = rep["operation"]
        if rep["status"] != "ok":
            a.update(
                replacement_status="failed",
                primary="kept_failed",
                failure_reason=f"{rep['operation']}: {rep['failure_reason']}",
            )
            ledger.failures[f"{rep['operation']}: {rep['failure_reason']}"] += 1
            if sid in quarantine:
                a["primary"] = QUARANTINED
                base.append(None)
                continue
            base.append(kept)
            continue
        row = _new_row(rep)
        if not ledger.take(row, row["operation"], sid):
            a.update(replacement_status="duplicate", replacement_id=row["sample_id"], primary="kept_duplicate")
            base.append(kept)
            continue
        a.update(replacement_status="ok", replacement_id=row["sample_id"], primary="replaced")
        base.append(row)
    return base


def _extension_candidates(input_rows: list[dict], extension: dict[str, dict], ledger: _Ledger) -> dict[str, dict]:
    """Phase 2: the successful, new extensions by origin id (failures and duplicates recorded)."""
    candidates: dict[str, dict] = {}
    for src in input_rows:
        sid = src["sample_id"]
        ext = extension.get(sid)
        if ext is None:
            continue
        a = ledger.acc[sid]
        if ext["status"] != "ok":
            reason = f"{EXTENDED}: {ext['failure_reason']}"
            a.update(extension_status="failed", failure_reason="; ".join(x for x in (a["failure_reason"], reason) if x))
            ledger.failures[reason] += 1
            continue
        row = _new_row(ext)
        a["extension_id"] = row["sample_id"]
        if not ledger.take(row, EXTENDED, sid):
            a["extension_status"] = "duplicate"
            continue
        candidates[sid] = row
    return candidates


def _size_policy(
    input_rows: list[dict],
    n_base: int,
    candidates: dict[str, dict],
    size_policy: str,
    max_growth: float,
    sparse_order: list[str] | None,
) -> tuple[set[str], list[str], int | None]:
    """Phase 3: which extensions the size policy lets in (origin ids), which it drops, and the
    size cap (None under ``grow``)."""
    if size_policy != "keep":
        return set(candidates), [], None
    cap = math.floor(len(input_rows) * (1.0 + max_growth) + 1e-9)
    budget = max(cap - n_base, 0)
    rank = {sid: i for i, sid in enumerate(sparse_order or [])}
    position = {r["sample_id"]: i for i, r in enumerate(input_rows)}
    priority = sorted(candidates, key=lambda s: (rank.get(s, len(rank)), position[s]))
    return set(priority[:budget]), priority[budget:], cap


def _counts(
    input_rows: list[dict],
    refined: pl.DataFrame,
    dataset: pl.DataFrame,
    accounting: pl.DataFrame,
    ledger: _Ledger,
    n_dropped: int,
    size_policy: str,
    max_growth: float,
    cap: int | None,
) -> dict:
    """Phase 4: the JSON-serializable summary."""
    per_op = {}
    for op in (SIMPLIFIED, REWRITTEN, EXTENDED):
        sub = refined.filter(pl.col("operation") == op)
        per_op[op] = {
            "attempted": sub.height,
            "succeeded": sub.filter(pl.col("status") == "ok").height,
            "failed": sub.filter(pl.col("status") != "ok").height,
            "duplicates": sum(1 for d in ledger.duplicates if d["operation"] == op),
            "in_output": dataset.filter(pl.col("operation") == op).height,
        }
    return {
        "n_in": len(input_rows),
        "n_out": dataset.height,
        "growth": round(dataset.height / max(len(input_rows), 1) - 1.0, 6),
        "kept": dataset.filter(pl.col("operation") == KEPT).height,
        "operations": per_op,
        "rows_by_operation": {
            op: dataset.filter(pl.col("operation") == op).height for op in (KEPT, SIMPLIFIED, REWRITTEN, EXTENDED)
        },
        "duplicates_removed": len(ledger.duplicates),
        "failures": sum(ledger.failures.values()),
        "failures_by_reason": dict(sorted(ledger.failures.items())),
        "dropped_by_size_policy": n_dropped,
        "size_policy": size_policy,
        "max_growth": max_growth if size_policy == "keep" else None,
        "size_cap": cap,
        "fates": dict(sorted(Counter(accounting["fate"].to_list()).items())),
        "quarantined": int(accounting["fate"].str.starts_with(QUARANTINED).sum()),
    }


def check_conservation(samples: pl.DataFrame, dataset: pl.DataFrame, accounting: pl.DataFrame) -> list[str]:
    """What is wrong with a merge's bookkeeping (empty = every sample accounted for).

    Checks: every input id has exactly one accounting row and no other ids do; every output
    row is either a kept input row (``origin_id`` = its own id), an original a rollback restored,
    or a new row whose origin is an input sample; no output id repeats; every fate agrees with
    the output (a kept sample is in it, a replaced one is not and its replacement is, an added
    extension is, a withdrawn one is not and the original it had replaced is).
    """
    in_ids = samples["sample_id"].to_list()
    problems = _accounting_problems(in_ids, accounting["sample_id"].to_list())
    out_count = Counter(dataset["sample_id"].to_list())
    dup = sorted(s for s, n in out_count.items() if n > 1)
    if dup:
        problems.append(f"{len(dup)} sample ids appear more than once in the output, e.g. {dup[:3]}")
    # a rollback restores the originals its withdrawn rows had replaced: kept rows, not input samples
    restored = {
        a["replacement_id"]
        for a in accounting.iter_rows(named=True)
        if a["fate"] == WITHDRAWN and a["replacement_operation"] in _REPLACING and a["replacement_id"]
    }
    kept_ids = _output_row_problems(dataset, set(in_ids), restored, problems)
    derived = {
        (r["origin_id"], r["operation"]): r["sample_id"]
        for r in dataset.filter(pl.col("operation") != KEPT).iter_rows(named=True)
    }
    for a in accounting.iter_rows(named=True):
        problems += _fate_problems(a, kept_ids, out_count, derived)
    return problems


def _accounting_problems(in_ids: list[str], acc_ids: list[str]) -> list[str]:
    """Input samples without an accounting row, rows for other ids, samples accounted twice."""
    problems = []
    acc_count = Counter(acc_ids)
    missing = [s for s in in_ids if s not in acc_count]
    if missing:
        problems.append(f"{len(missing)} input samples without an accounting row, e.g. {missing[:3]}")
    extra = sorted(set(acc_ids) - set(in_ids))
    if extra:
        problems.append(f"{len(extra)} accounting rows for ids not in the input, e.g. {extra[:3]}")
    repeated = sorted(s for s, n in acc_count.items() if n > 1)
    if repeated:
        problems.append(f"{len(repeated)} input samples accounted for more than once, e.g. {repeated[:3]}")
    return problems


def _output_row_problems(dataset: pl.DataFrame, in_set: set, restored: set, problems: list[str]) -> set:
    """Adds to ``problems`` every output row that is neither a kept input (or restored) row nor
    derived from an input sample; returns the ids of the kept rows."""
    kept_ids = set()
    for r in dataset.select("sample_id", "origin_id", "operation").iter_rows(named=True):
        if r["operation"] == KEPT:
            if r["sample_id"] not in in_set and r["sample_id"] not in restored:
                problems.append(f"kept row {r['sample_id']} is not an input sample")
            elif r["origin_id"] != r["sample_id"]:
                problems.append(f"kept row {r['sample_id']} has origin_id {r['origin_id']!r}, expected its own id")
            kept_ids.add(r["sample_id"])
        elif r["origin_id"] not in in_set:
            problems.append(f"{r['operation']} row {r['sample_id']} has origin {r['origin_id']!r}, not an input sample")
    return kept_ids


def _fate_problems(a: dict, kept_ids: set, out_count: Counter, derived: dict) -> list[str]:
    """Where one accounting row's fate disagrees with the output."""
    problems = []
    sid, fate = a["sample_id"], a["fate"] or ""
    primary, _, extended = fate.partition("+")
    if primary in ("kept", "kept_failed", "kept_duplicate"):
        if sid not in kept_ids:
            problems.append(f"{sid}: fate {fate!r} but not in the output as a kept row")
    elif primary == "replaced":
        op = a.get("replacement_operation")
        if sid in kept_ids:
            problems.append(f"{sid}: fate 'replaced' but still in the output")
        if not a.get("replacement_id") or derived.get((sid, op)) != a.get("replacement_id"):
            problems.append(f"{sid}: replacement {a.get('replacement_id')!r} ({op}) not in the output")
    elif primary == QUARANTINED:
        if sid in out_count:
            problems.append(f"{sid}: fate 'quarantined' but still in the output")
    elif primary == WITHDRAWN:
        if sid in out_count:
            problems.append(f"{sid}: fate 'withdrawn' but still in the output")
        if a.get("replacement_operation") in _REPLACING and a.get("replacement_id") not in kept_ids:
            problems.append(
                f"{sid}: withdrawn, but the original it replaced ({a.get('replacement_id')!r}) is not restored"
            )
    else:
        problems.append(f"{sid}: unknown fate {fate!r}")
    if extended == "extended" and derived.get((sid, EXTENDED)) != a.get("extension_id"):
        problems.append(f"{sid}: extension {a.get('extension_id')!r} not in the output")
    if extended not in ("", "extended"):
        problems.append(f"{sid}: unknown fate {fate!r}")
    if extended == "" and (sid, EXTENDED) in derived:
        problems.append(f"{sid}: an extension is in the output but the fate does not say so")
    return problems
