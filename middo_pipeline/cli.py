"""The ``middo`` command line.

One subparser and one ``cmd_<name>`` function per subcommand; heavy imports (polars, torch,
dagster) happen inside the command that needs them, so ``middo --help`` stays fast.

    middo validate PATH [--format F] [--max-chars N] [--show N]
    middo loop --rounds N [--seed PATH] [--config FILE|tiny|gpu]
    middo summary
    middo export --round R --format jsonl|json|parquet [--layout alpaca|messages] [--quarantined] --out PATH|-

Exit codes of ``validate``: 0 every record is usable, 1 some records were rejected, 2 the file
as a whole is unusable or no record is usable (or the command line is wrong).
Exit codes of ``export``: 0 written, 2 nothing written (no such round; an output path that is
not a regular file: links, FIFOs, devices and folders are never replaced; ``--out -`` writes to
standard output).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from middo_pipeline.constants import SEED_FORMATS

DEFAULT_SHOW = 20


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a seed file: format, usable rows, every rejected row and why."""
    from middo_pipeline.core.ingest import SeedFileError, read_seed

    try:
        result = read_seed(args.path, format=args.format, max_chars=args.max_chars)
    except SeedFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    how = "given" if args.format else "detected"
    print(f"{result.source_file}: format {result.format} ({how})")
    print(f"records: {result.total_records}")
    print(f"usable: {result.usable}")
    print(f"rejected: {result.rejected}")
    if result.format in ("sharegpt", "messages") or result.truncated_conversations:
        print(f"truncated conversations (first pair kept): {result.truncated_conversations}")
    if not result.rejected:
        return 0
    code = 1

    lines = result.rejection_lines()
    shown = lines if args.show < 0 else lines[: args.show]
    for line in shown:
        print(line)
    if len(shown) < len(lines):
        print(f"... and {len(lines) - len(shown)} more rejected records (--show N lists more, --show -1 all)")
    print("rejected by reason:")
    counts = result.rejected_by_reason()
    width = max(len(str(n)) for n in counts.values())
    for kind, n in counts.items():
        print(f"  {n:>{width}}  {kind}")
    if not result.usable:
        print(
            f"error: {result.source_file}: no usable records ({result.rejected} rejected); "
            "`middo loop` would refuse this file",
            file=sys.stderr,
        )
        code = 2
    return code


def cmd_loop(args: argparse.Namespace) -> int:
    """Run the next N rounds on the Dagster instance at $DAGSTER_HOME and print a summary per round."""
    import os

    # the steps log their own progress (done, rate, ETA); transformers' per-load and per-save
    # bars would only interleave with it. Set before transformers is imported; env wins.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from middo_pipeline.loop import load_run_config, run_rounds
    from middo_pipeline.preflight import PreflightError

    try:
        config = load_run_config(args.config)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summaries = run_rounds(
            args.rounds,
            seed_path=args.seed,
            config=config,
            log=lambda m: print(m, flush=True),
            config_source=args.config,
        )
    except PreflightError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        print("nothing was run", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\nround summary")
    _print_rounds([(s.round, s.metadata) for s in summaries])
    print(f"open the UI with: {ui_command()}   (DAGSTER_HOME must be the same)")
    return 0


def ui_command() -> str:
    """How to open the UI: the checkout's scripts/ui.sh when there is one next to this package's
    source, else (an installed wheel) the ``dagster dev`` command that script runs."""
    if (Path(__file__).resolve().parents[1] / "scripts" / "ui.sh").is_file():
        return "bash scripts/ui.sh"
    return "dagster dev -m middo_pipeline.definitions -h 127.0.0.1 -p 3000"


def _print_rounds(rows: list[tuple[str, dict]]) -> None:
    """One line per round, columns aligned; '-' where a figure is missing (a round not finished).
    Then the wall seconds per step, one line per round, and any round's warnings."""
    extra = ("step_seconds", "warnings")
    keys = [k for k in rows[0][1] if k not in extra] if rows else []
    _print_table(["round"] + keys, [[key] + [md.get(k) for k in keys] for key, md in rows])
    steps = [(key, md.get("step_seconds") or {}) for key, md in rows]
    cols = list(next((s for _, s in steps if s), {}))
    if cols:
        print("\n  seconds per step (wall)")
        _print_table(["round"] + cols, [[key] + [s.get(c) for c in cols] for key, s in steps])
    for _, md in rows:
        for w in md.get("warnings") or []:
            print(w)


def _print_table(head: list[str], rows: list[list]) -> None:
    table = [head] + [
        ["-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))


def cmd_summary(args: argparse.Namespace) -> int:
    """Print the figures of every round recorded in the instance at $DAGSTER_HOME (runs nothing)."""
    from dagster import DagsterInstance

    from middo_pipeline.loop import ensure_dagster_home, summarize_round
    from middo_pipeline.rounds import existing_rounds, round_key

    home = ensure_dagster_home(create=False)  # runs nothing: creates nothing
    if not home.is_dir():
        print(
            f"no rounds recorded: {home} does not exist; run `middo loop --rounds N` first "
            "(with the same DAGSTER_HOME)",
            file=sys.stderr,
        )
        return 1
    with DagsterInstance.get() as instance:
        rows = [(round_key(n), summarize_round(instance, round_key(n))) for n in existing_rounds(instance)]
    if not rows:
        print(
            f"no rounds recorded in {home}; run `middo loop --rounds N` first (with the same DAGSTER_HOME)",
            file=sys.stderr,
        )
        return 1
    _print_rounds(rows)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a round's optimized dataset (or, with --quarantined, the samples its merge
    quarantined as unrepaired) with provenance on every row."""
    from middo_pipeline.core.merge import UNREPAIRED_TABLE
    from middo_pipeline.core.storage import Storage
    from middo_pipeline.loop import ensure_dagster_home

    ensure_dagster_home(create=False)
    if args.quarantined:
        return _export(args, UNREPAIRED_TABLE, "samples quarantined as unrepaired")
    code = _export(args, "optimized_dataset", "rows")
    note = _verified_note(Storage(), args.round) if code == 0 else None
    if note:
        print(f"note: {note}", file=sys.stderr)
    return code


def _export(args: argparse.Namespace, table: str, what: str) -> int:
    """Write round R's ``table`` to ``args.out``: 0 written, 2 nothing written (said why)."""
    import polars as pl

    from middo_pipeline.core.export import ExportError, export_table
    from middo_pipeline.core.storage import Storage
    from middo_pipeline.rounds import round_key

    path = Storage().table_path(table, round_key(args.round))
    if not path.exists():
        print(
            f"error: round {args.round} has no {table} at {path}; run `middo loop` first "
            f"(and use the same DAGSTER_HOME / MIDDO_HOME)",
            file=sys.stderr,
        )
        return 2
    df = pl.read_parquet(path)
    try:
        out = export_table(df, args.out, fmt=args.format, layout=args.layout)
    except ExportError as e:
        print(f"error: {e}; nothing written", file=sys.stderr)
        return 2
    where = "standard output" if out == "-" else out
    print(
        f"wrote {df.height} {what} of round-{args.round} to {where} ({args.format}, {args.layout} layout)",
        file=sys.stderr if out == "-" else sys.stdout,
    )
    return 0


def _verified_note(store, r: int) -> str | None:
    """What the next round said of round r's output: nothing yet (not trained on), or a rollback."""
    import polars as pl

    from middo_pipeline.rounds import round_key

    nxt = round_key(r + 1)
    acc = store.table_path("sample_accounting", nxt)
    if acc.exists() and pl.read_parquet(acc).filter(pl.col("fate") == "withdrawn").height:
        return (
            f"{nxt} trained on this data and found it worse than round-{r}'s input, and rolled it back: "
            f"{nxt}'s optimized_dataset is the data it went back to"
        )
    if not store.table_path("round_evaluation", nxt).exists():
        return (
            f"no model has been trained on this data yet ({nxt} does that, and rolls it back if it trains a "
            f"significantly worse model than round-{r}'s input)"
        )
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="middo", description="Middo closed-loop data optimization for LLM fine-tuning."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    validate = sub.add_parser(
        "validate",
        help="check a seed file and list every record that cannot be used",
        description=(
            "Read a seed file (Alpaca JSON/JSONL, ShareGPT, OpenAI messages, Parquet) as the "
            "pipeline would and report every rejected record. Exit status: 0 clean, "
            "1 some records rejected, 2 the file is unusable or no record is usable."
        ),
    )
    validate.add_argument("path", metavar="PATH", help="the seed file")
    validate.add_argument("--format", choices=SEED_FORMATS, default=None, help="skip detection and read as this format")
    validate.add_argument(
        "--max-chars",
        type=_positive_int,
        default=16_000,
        metavar="N",
        help="reject records whose instruction+input+output is longer (default: 16000)",
    )
    validate.add_argument(
        "--show",
        type=int,
        default=DEFAULT_SHOW,
        metavar="N",
        help=f"list at most N rejected records (default: {DEFAULT_SHOW}; -1: all; 0: none)",
    )
    validate.set_defaults(func=cmd_validate)

    loop = sub.add_parser(
        "loop",
        help="run the next N Middo rounds on the Dagster instance at $DAGSTER_HOME",
        description="Materialize the seed (if needed) and the next N round partitions in order; "
        "they show up in the UI afterwards. DAGSTER_HOME defaults to ./.dagster_home.",
    )
    loop.add_argument("--rounds", type=_positive_int, default=1, metavar="N", help="how many rounds (default 1)")
    loop.add_argument("--seed", default=None, metavar="PATH", help="(re)ingest this seed file first")
    loop.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML run config (ops only; resources come from MIDDO_* variables), or a preset: tiny, gpu",
    )
    loop.set_defaults(func=cmd_loop)

    summary = sub.add_parser(
        "summary",
        help="print every recorded round's figures (runs nothing)",
        description="The per-round table `middo loop` prints, for every round in $DAGSTER_HOME.",
    )
    summary.set_defaults(func=cmd_summary)

    export = sub.add_parser("export", help="write a round's optimized dataset with provenance fields")
    export.add_argument("--round", type=_positive_int, required=True, metavar="R")
    export.add_argument("--format", choices=("jsonl", "json", "parquet"), default="jsonl")
    export.add_argument(
        "--layout",
        choices=("alpaca", "messages"),
        default="alpaca",
        help="alpaca: instruction/input/output (LLaMA-Factory); messages: chat turns",
    )
    export.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="a regular file (replaced atomically; links, FIFOs, devices and folders are refused), "
        "or - for standard output",
    )
    export.add_argument(
        "--quarantined",
        action="store_true",
        help="write the samples the round quarantined as unrepaired (merge setting unrepaired: quarantine)",
    )
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
