"""Run loop rounds on a persistent Dagster instance, outside the UI (``middo loop``).

Runs go through the same jobs the UI and the nightly schedule launch, recorded in the
instance at ``$DAGSTER_HOME``, so they show up in the UI afterwards with all their metadata.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from dagster import AssetKey, DagsterInstance, Field, logger
from dagster._utils.log import coerce_valid_log_level, create_console_logger
from filelock import Timeout

from middo_pipeline.core.scheduling import stall_rounds, unchanged_streak
from middo_pipeline.core.storage import Storage
from middo_pipeline.preflight import PreflightError, preflight
from middo_pipeline.rounds import (
    ROUNDS,
    data_changed,
    existing_rounds,
    latest_materialization,
    latest_metadata,
    round_key,
    round_number,
)

ROUND_ASSET_OPS = {  # run-config keys under "ops" that belong to the round job / the seed job
    "round_dataset",
    "sft_checkpoint",
    "model_readouts",
    "loss_signals",
    "embedding_signals",
    "quality_signals",
    "refined_samples",
    "optimized_dataset",
    "round_evaluation",
}
PER_RUN_RESOURCES = {"evaluation"}  # resources a config file may set (the others come from MIDDO_* variables)


# Instance settings written into a new DAGSTER_HOME: no telemetry, and runs launched from the
# UI or the schedule are queued so that at most one run per round partition executes at a time.
DAGSTER_YAML = """\
telemetry:
  enabled: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    max_concurrent_runs: 4
    tag_concurrency_limits:
      - key: "dagster/partition"
        value:
          applyLimitPerUniqueValue: true
        limit: 1
"""


def _one_line_errors(record: logging.LogRecord) -> bool:
    """Below DEBUG verbosity, an error event shows its first line only, and step / run failures not
    at all (`middo loop` prints them on one line): the stack traces stay in the instance (the
    run's event log, and the UI)."""
    if record.levelno >= logging.ERROR:
        msg = record.getMessage()
        if " - STEP_FAILURE - " in msg or " - RUN_FAILURE - " in msg:
            return False  # `middo loop` prints the failure itself, on one line
        if "\n" in msg:
            record.msg, record.args = msg.split("\n", 1)[0], ()
    return True


@logger(
    {
        "log_level": Field(str, is_required=False, default_value="INFO"),
        "name": Field(str, is_required=False, default_value="dagster"),
    },
    description="The console logger of `middo loop`: Dagster's, with error events on one line unless log_level is DEBUG.",
)
def loop_console_logger(init_context) -> logging.Logger:
    level = coerce_valid_log_level(init_context.logger_config["log_level"])
    log = create_console_logger(name=init_context.logger_config["name"], level=level)
    if level > logging.DEBUG:
        for handler in log.handlers:
            handler.addFilter(_one_line_errors)
    return log


class RoundBusy(RuntimeError):
    """Another process is running this round right now."""


def ensure_dagster_home(create: bool = True) -> Path:
    """DAGSTER_HOME (./.dagster_home when unset), created with DAGSTER_YAML when new
    (``create=False``: only resolved and exported, for commands that run nothing)."""
    home = Path(os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()
    if not create:
        os.environ["DAGSTER_HOME"] = str(home)
        return home
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


PRESETS = Path(__file__).resolve().parent / "configs"


def load_run_config(path: str | None) -> dict:
    """A YAML run config (``ops: {asset: {config: ...}}``, ``resources: {evaluation: {config: ...}}``), or a preset name
    from ``middo_pipeline/configs`` ("tiny", "gpu")."""
    if not path:
        return {}
    if not Path(path).exists() and (PRESETS / f"{path}.yaml").exists():
        path = str(PRESETS / f"{path}.yaml")
    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory; --config takes a YAML file or a preset (tiny, gpu)") from None
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save the config as UTF-8"
        ) from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping with 'ops:' at the top")
    return cfg


def split_config(cfg: dict) -> tuple[dict, dict]:
    unknown_top = set(cfg) - {"ops", "resources"}
    if unknown_top:
        raise ValueError(f"unknown top-level config keys {sorted(unknown_top)}: only 'ops' and 'resources'")
    resources = cfg.get("resources") or {}
    if not isinstance(resources, dict) or set(resources) - PER_RUN_RESOURCES:
        found = sorted(resources) if isinstance(resources, dict) else resources
        raise ValueError(
            f"resources: {found!r:.60}: only {sorted(PER_RUN_RESOURCES)} is set in a config file (the other "
            "resources come from MIDDO_* environment variables, see docs/configuration.md)"
        )
    ops = cfg.get("ops") or {}
    if not isinstance(ops, dict):
        raise ValueError(
            f"'ops' must be a mapping of asset names to {{config: ...}}, found {type(ops).__name__} {ops!r:.40}"
        )
    unknown = set(ops) - ROUND_ASSET_OPS - {"seed_dataset"}
    if unknown:
        raise ValueError(
            f"unknown entries under ops: {sorted(unknown)}; known: seed_dataset, {sorted(ROUND_ASSET_OPS)}"
        )
    seed = {"ops": {k: v for k, v in ops.items() if k == "seed_dataset"}}
    rnd = {"ops": {k: v for k, v in ops.items() if k in ROUND_ASSET_OPS}}
    if resources:
        rnd["resources"] = resources
    return seed, rnd


@dataclass
class RoundSummary:
    round: str
    success: bool
    run_id: str
    metadata: dict = field(default_factory=dict)


# the per-step seconds shown in the summary: column -> the round's steps (op names) whose wall
# seconds add up to it; "gen" and "verify" split refined_samples by its own metadata
STEP_COLUMNS = {
    "train": ("sft_checkpoint",),
    "readouts": ("model_readouts",),
    "signals": ("loss_signals", "embedding_signals", "quality_signals"),
    "optimize": ("refined_samples", "optimized_dataset"),
    "eval": ("round_evaluation",),
}
ROUND_STEPS = ("round_dataset", *(op for ops in STEP_COLUMNS.values() for op in ops))


def step_seconds(instance: DagsterInstance, key: str) -> dict:
    """Wall seconds of each round step (from the step start and end Dagster records for the run
    that materialized it), grouped as ``STEP_COLUMNS``, plus ``gen`` / ``verify`` (the optimizer
    generation and verified refinement inside ``refined_samples``) and ``total`` (every step).
    A step not materialized is missing (None)."""
    per_op: dict[str, float] = {}
    runs: dict[str, dict[str, float]] = {}
    for op in ROUND_STEPS:
        rec = latest_materialization(instance, op, key)
        if rec is None or not rec.run_id:
            continue
        if rec.run_id not in runs:
            stats = instance.get_run_step_stats(rec.run_id)
            runs[rec.run_id] = {s.step_key: s.end_time - s.start_time for s in stats if s.start_time and s.end_time}
        if op in runs[rec.run_id]:
            per_op[op] = runs[rec.run_id][op]
    cols: dict = {}
    for col, ops in STEP_COLUMNS.items():
        got = [per_op[o] for o in ops if o in per_op]
        cols[col] = round(sum(got), 1) if got else None
    ref = latest_metadata(instance, "refined_samples", key)
    order = ("train", "readouts", "signals", "optimize", "gen", "verify", "eval")
    out = {c: cols.get(c) for c in order}
    out["gen"] = ref.get("generation_seconds")
    out["verify"] = ref.get("verification_seconds")
    out["total"] = round(sum(per_op.values()), 1) if per_op else None
    return out


def round_warnings(instance: DagsterInstance, key: str) -> list[str]:
    """What a round that 'succeeded' should still say loudly: every optimizer call failed; the
    gate accepted nothing (a note: the data did not change); the data has not changed for two
    rounds or more (a note: the nightly schedule stops at ``MIDDO_STALL_ROUNDS``); its
    checkpoint is an earlier round's, not retrained (a note); its data trained a significantly
    worse model than the previous round's (and was rolled back, unless on_regression: keep)."""
    out = []
    cand = latest_metadata(instance, "refinement_candidates", key)
    n, ok = cand.get("candidates"), cand.get("generated")
    ref = latest_metadata(instance, "refined_samples", key)
    if n and not ok:
        out.append(
            f"WARNING {key}: all {n} optimizer candidates failed (prompt style {ref.get('prompt_style')}): "
            "nothing was refined; see the refined_samples check 'optimizer_calls' for the reasons"
        )
    if ok and ref.get("attempted") and not ref.get("accepted"):
        out.append(
            f"NOTE {key}: the gate accepted none of {ref['attempted']} refinements (acceptance bar "
            f"{ref.get('acceptance_bar')}: {ref.get('acceptance_bar_reason')}): the round's data is unchanged. "
            "See refined_samples' 'rejected_examples'; a stronger optimizer (a served model) gets the method's bar"
        )
    r = round_number(key)
    streak = unchanged_streak(data_changed(instance, round_key(n)) for n in range(r, 0, -1))
    if streak >= 2:
        stall = stall_rounds()
        out.append(
            f"NOTE {key}: the data is unchanged for {streak} rounds in a row (round-{r - streak + 1} "
            f"to {key}); "
            + (
                f"the nightly schedule stops starting rounds after {stall} such rounds (MIDDO_STALL_ROUNDS; "
                "`middo loop` and the UI still run them)"
                if stall
                else "MIDDO_STALL_ROUNDS=0: the nightly schedule keeps starting rounds"
            )
        )
    ck = latest_metadata(instance, "sft_checkpoint", key)
    if ck.get("reused_from"):
        out.append(
            f"NOTE {key}: sft_checkpoint is {ck['reused_from']}'s, copied, not retrained: the same rows in the same "
            f"order with the same settings would train the same weights ({ck.get('training_seconds_saved')} s of "
            "training saved; sft_checkpoint reuse_identical: false retrains)"
        )
    ev = latest_metadata(instance, "round_evaluation", key)
    opt = latest_metadata(instance, "optimized_dataset", key)
    if opt.get("rolled_back"):
        not_made = (
            f"its {ref['skipped_for_rollback']} planned refinements not generated (refined_samples)"
            if ref.get("skipped_for_rollback")
            else f"this round's {opt.get('refinements_not_merged')} refinements not merged"
        )
        out.append(
            f"WARNING {key}: {opt.get('regression_decision')}. The next round trains on the previous round's data "
            f"again: {opt.get('withdrawn')} rows withdrawn, {opt.get('restored')} originals restored, {not_made} "
            "(optimized_dataset, sample_accounting; on_regression: keep turns this off)"
        )
    elif ev.get("worse_than_previous_round"):
        out.append(
            f"WARNING {key}: trained a significantly worse model than the previous round "
            f"(MC accuracy {ev.get('mc_accuracy_change_vs_previous_round'):+.3f}, 95% interval "
            f"{ev.get('mc_accuracy_change_vs_previous_round_ci95')}; held-out loss change "
            f"{ev.get('loss_change_vs_previous_round'):+.3f}, > 0 better; over items of one training run, so a "
            "small change may be training order alone: retrain with another seed to confirm): see the "
            "round_evaluation check 'no_regression' and the previous round's refined_samples"
            + (f". optimized_dataset: {opt['regression_decision']}" if opt.get("regression_decision") else "")
        )
    return out


def summarize_round(instance: DagsterInstance, key: str) -> dict:
    sig = {
        "rows_in": latest_metadata(instance, "round_dataset", key).get("rows"),
        "hard": latest_metadata(instance, "loss_signals", key).get("hard"),
        "sparse": latest_metadata(instance, "embedding_signals", key).get("sparse"),
        "low_quality": latest_metadata(instance, "quality_signals", key).get("low_quality"),
    }
    ref = latest_metadata(instance, "refined_samples", key)
    opt = latest_metadata(instance, "optimized_dataset", key)
    ev = latest_metadata(instance, "round_evaluation", key)
    ck = latest_metadata(instance, "sft_checkpoint", key)
    return sig | {
        "train_final_loss": ck.get("final_loss"),
        "refined_ok": ref.get("succeeded"),
        "refined_rejected": ref.get("rejected"),
        "refined_failed": ref.get("failed"),
        "rows_out": opt.get("rows_after"),
        "rolled_back": opt.get("rolled_back"),
        "eval_loss": ev.get("mean_response_loss"),
        "eval_mc_accuracy": ev.get("mc_accuracy"),
        "base_mc_accuracy": ev.get("base_mc_accuracy"),
        "step_seconds": step_seconds(instance, key),
        "warnings": round_warnings(instance, key),
    }


def run_rounds(
    n: int,
    *,
    seed_path: str | None = None,
    config: dict | None = None,
    log=print,
    env: dict | None = None,
    config_source: str | None = None,
) -> list[RoundSummary]:
    """Materialize the seed if needed (or when ``seed_path`` is given), then the next ``n`` rounds in order.
    Resources come from ``env`` (default: the process environment; see ``definitions``).
    Raises :class:`PreflightError` (nothing run) when a setting or the run config is wrong."""
    from middo_pipeline.jobs import ROUND_JOB, SEED_JOB

    try:
        # importing definitions builds the default code location, which reads the environment too
        from middo_pipeline.definitions import build_defs

        defs = build_defs(env)
    except ValueError as exc:  # a MIDDO_* variable that cannot be used
        raise PreflightError([str(exc)]) from None
    source = config_source or "run config"
    seed_cfg, round_cfg = _run_configs(config, source, seed_path)
    # before anything is materialized: resources resolvable, run config valid, storage writable
    preflight(defs, {SEED_JOB: seed_cfg, ROUND_JOB: round_cfg}, source=source, env=env)
    ensure_dagster_home()
    store = Storage((env or os.environ).get("MIDDO_HOME") or None)
    with DagsterInstance.get() as instance:
        _ensure_seed(instance, defs, seed_cfg, seed_path, source, log)
        done = existing_rounds(instance)
        start = (max(done) + 1) if done else 1
        if done and latest_materialization(instance, "optimized_dataset", round_key(max(done))) is None:
            start = max(done)  # the last round did not finish: resume it (cached LLM calls are reused)
            log(f"{round_key(start)} did not finish before: resuming it")
        job = defs.resolve_job_def(ROUND_JOB).with_logger_defs({"console": loop_console_logger})
        return [_run_round(instance, job, store, round_key(r), round_cfg, log) for r in range(start, start + n)]


def _run_configs(config: dict | None, source: str, seed_path: str | None) -> tuple[dict, dict]:
    """The seed job's and the round job's run config from ``config`` (progress lines at INFO; the
    step-by-step DEBUG events stay in the instance and the UI), the seed file path filled in."""
    quiet = {"loggers": {"console": {"config": {"log_level": os.environ.get("MIDDO_LOG_LEVEL", "INFO")}}}}
    try:
        seed_cfg, round_cfg = ({**quiet, **c} for c in split_config(config or {}))
    except ValueError as exc:
        raise PreflightError([f"{source}: {exc}"]) from None
    if seed_path:
        seed_cfg["ops"].setdefault("seed_dataset", {}).setdefault("config", {})["path"] = str(Path(seed_path).resolve())
    return seed_cfg, round_cfg


def _ensure_seed(instance: DagsterInstance, defs, seed_cfg: dict, seed_path: str | None, source: str, log) -> None:
    """Materialize seed_dataset when it is missing, a seed file is given or the run config sets it;
    on an instance that has rounds, only the seed they grew from is accepted (and not ingested again)."""
    seed_done = instance.get_latest_materialization_event(AssetKey("seed_dataset")) is not None
    if seed_path and existing_rounds(instance):
        problem = seed_conflict(instance, seed_path)
        if problem:
            raise PreflightError([problem])
        log(f"seed {seed_path} is the one the rounds grew from: not ingested again")
        seed_path, seed_cfg["ops"] = None, {k: v for k, v in seed_cfg["ops"].items() if k != "seed_dataset"}
    elif seed_cfg["ops"] and existing_rounds(instance):
        raise PreflightError(
            [
                f"{source}: ops.seed_dataset would ingest a seed again on an instance that already "
                "has rounds; remove it (the rounds continue from their own data), or start a "
                "fresh instance (another DAGSTER_HOME and MIDDO_HOME)"
            ]
        )
    if seed_path or not seed_done or seed_cfg["ops"]:
        from middo_pipeline.jobs import SEED_JOB

        log("materializing seed_dataset …")
        job = defs.resolve_job_def(SEED_JOB).with_logger_defs({"console": loop_console_logger})
        res = job.execute_in_process(instance=instance, run_config=seed_cfg, raise_on_error=False)
        if not res.success:
            raise RuntimeError(_failure_message(res, "seed_dataset"))
        md = latest_metadata(instance, "seed_dataset", None)
        log(f"seed_dataset: {md.get('rows')} rows, {md.get('rejected')} rejected ({md.get('format')})")


def _run_round(instance: DagsterInstance, job, store: Storage, key: str, round_cfg: dict, log) -> RoundSummary:
    """One round: its partition added, run under the round's lock, its summary logged; a failed
    round raises."""
    from middo_pipeline.jobs import ROUND_JOB

    if not instance.has_dynamic_partition(ROUNDS, key):
        instance.add_dynamic_partitions(ROUNDS, [key])
    log(f"=== {key}: running {ROUND_JOB} (DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
    lock = store.lock("round", key)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RoundBusy(
            f"{key} is being run by another process right now (lock {lock.lock_file}); wait for it to finish"
        ) from None
    try:
        res = job.execute_in_process(instance=instance, partition_key=key, run_config=round_cfg, raise_on_error=False)
    finally:
        lock.release()
    summary = RoundSummary(key, res.success, res.run_id, summarize_round(instance, key))
    log(
        f"{key}: "
        + ", ".join(f"{k}={_fmt(v)}" for k, v in summary.metadata.items() if k not in ("step_seconds", "warnings"))
    )
    log(f"{key} seconds: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary.metadata["step_seconds"].items()))
    for w in summary.metadata["warnings"]:
        log(w)
    if not res.success:
        raise RuntimeError(_failure_message(res, key))
    return summary


def seed_conflict(instance: DagsterInstance, seed_path: str) -> str | None:
    """Why ``--seed seed_path`` cannot be used on an instance that already has rounds, or None
    when it is the very file (same content) the rounds grew from."""
    from middo_pipeline.assets.ingestion import file_sha256

    rounds = existing_rounds(instance)
    prev = latest_metadata(instance, "seed_dataset", None)
    try:
        same = prev.get("file_sha256") is not None and file_sha256(seed_path) == prev["file_sha256"]
    except OSError:
        same = False
    if same:
        return None
    home = os.environ.get("DAGSTER_HOME", "")
    return (
        f"--seed {seed_path}: this instance ({home}) already has {round_key(max(rounds))}, grown from the seed "
        f"{prev.get('path', 'ingested before')}; the next round continues from {round_key(max(rounds))}'s optimized "
        "data and would ignore a new seed. Run without --seed to continue, or start a new lineage from the new "
        "seed in a fresh instance: DAGSTER_HOME=<new folder> MIDDO_HOME=<new folder>/middo middo loop --seed ..."
    )


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


_DAGSTER_WRAPPERS = (
    "DagsterExecutionStepExecutionError",
    "DagsterExecutionHandleOutputError",
    "DagsterExecutionLoadInputError",
)


def _failure_message(res, what: str) -> str:
    """One line: what failed, in which step, why (the error's own message; the class only when the
    error is not one of ours), and where the full log is."""
    log_file = Path(os.environ["DAGSTER_HOME"]) / "history" / "runs" / f"{res.run_id}.db"
    where = f"full log: run {res.run_id} in the UI, or {log_file}; MIDDO_LOG_LEVEL=DEBUG prints the trace"
    for event in res.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            err = event.step_failure_data.error
            # Dagster wraps the real error (an asset's, or the IO manager's while storing / loading)
            while err.cause is not None and err.cls_name in _DAGSTER_WRAPPERS:
                err = err.cause
            msg = " ".join(err.message.strip().split("\n", 1)[0].split())
            # format_exception_only writes "package.module.Class: message"; keep the message
            head, sep, rest = msg.partition(": ")
            if sep and head.rsplit(".", 1)[-1] == err.cls_name:
                msg = rest
            if not _is_ours(err.cls_name, head):
                msg = f"{err.cls_name}: {msg}"
            return f"{what} failed in step {event.step_key}: {msg} [{where}]"
    return f"{what} failed [{where}]"


def _is_ours(cls_name: str, qualified: str) -> bool:
    """Errors raised on purpose with a message written for the user (no class name needed)."""
    return qualified.startswith("middo_pipeline.") or cls_name in (
        "StorageError",
        "SeedFileError",
        "PreflightError",
        "BackendUnavailable",
    )
