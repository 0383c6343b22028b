"""What every benchmark section shares: settings per mode, the model, the seed data, timers,
peak-memory sampling and the atomic JSON write."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from middo_pipeline.atomic import atomic_path
from middo_pipeline.constants import DEFAULT_MODEL

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEED_PATH = Path(os.environ.get("MIDDO_BENCH_SEED") or REPO / "data" / "seed_alpaca.json")
EVAL_PATH = Path(os.environ.get("MIDDO_BENCH_EVAL") or REPO / "data" / "eval_heldout.jsonl")


# ----------------------------------------------------------------------------------------------
# settings


@dataclass
class Settings:
    """How big each section runs. ``quick`` fits in a few minutes on 2 busy CPU cores;
    ``full`` is meant for a GPU (it also runs on CPU, for a long time)."""

    mode: str
    model: str = DEFAULT_MODEL  # the packaged default
    device: str = "auto"
    threads: int | None = None
    # signal pass: ours vs the reference's way
    speed_samples: int = 16
    speed_repeats: int = 2
    max_length: int = 384
    # diversity top-k
    knn_sizes: tuple[int, ...] = (10_000, 100_000)  # measured for real
    knn_extrapolate: tuple[int, ...] = (1_000_000,)  # computed from the measured ones
    knn_dense_max_bytes: int = 4 << 30  # measure the dense N x N only when its matrix is below this
    knn_timeout_s: int = 360
    # quality judge
    judge_samples: int = 8  # rows of the controlled set judged both ways
    judge_max_new_tokens: int = 192  # the reference allows 1024: a lower cap makes its way cheaper here
    judge_batch_size: int = 8
    # detection (controlled dataset)
    # 40 clean topics x 3 (the sample and 2 paraphrases: neighbours for k = 2), 30 of each quality
    # defect kind, 32 hard, 32 isolated; one real epoch of LoRA for the "after" checkpoint
    det_clean: int = 40
    det_clean_siblings: int = 2
    det_quality: int = 120  # 4 kinds x 30
    det_hard: int = 32
    det_dup_clusters: int = 0
    det_dup_size: int = 3
    det_isolated: int = 32
    det_train_steps: int = -1  # -1: det_epochs decide
    det_epochs: float = 1.0
    det_batch_size: int = 8
    det_max_length: int = 256
    det_bootstrap: int = 1000
    det_embedding: tuple = ("mean", "last", 1)  # the pipeline's default (pooling, layer, top components removed)
    det_quality_mode: str = "ifd"  # the pipeline's default quality reading
    # downstream
    downstream: bool = False
    down_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    down_candidates: int = 2  # candidates per flagged sample in the round that makes the data
    down_variants: tuple[str, ...] = (
        "seed",
        "gate_on",
        "gate_off",
        "seed_reshuffled",
        "simplify_only",
        "rewrite_only",
        "extend_only",
    )
    down_equal_steps: tuple[str, ...] = ("gate_on",)  # also trained for exactly the seed data's steps
    down_partial: str | None = None  # JSON written after every training run (what is complete so far)
    down_from: str | None = None  # MIDDO_HOME of a finished round 1 (e.g. the demo's): reuse its candidates
    down_run_cache: str | None = "~/.cache/middo-pipeline/bench-downstream"  # per-run results, reused when identical
    down_regate: bool = True  # with down_from: judge the stored candidates again with this version's gate
    # gate: the verification gate against candidates of known kind, on a round of the controlled set
    gate_candidates: int = 1  # the optimizer's own candidates per flagged sample in that round
    gate_from: str | None = None  # MIDDO_HOME of a finished controlled round: reuse it
    gate_keep: str | None = None  # run the controlled round in this folder and keep it
    # optimizer generation: the same requests through each local path (benchmarks/generation.py)
    train_steps: int = 8  # training section: LoRA steps per way (response positions only vs every position)
    train_repeats: int = 2
    gen_requests: int = 64
    gen_repeats: int = 2
    gen_batch_sizes: tuple[int, ...] = (32,)  # transformers' generate at a larger batch (16 measured: 1.30x)
    gen_compact_batch_sizes: tuple[int, ...] = (8, 16, 32, 64)  # finished rows leave the batch (the default engine)
    gen_int8: bool = True  # CPU only
    gen_int8_batch_sizes: tuple[int, ...] = (64,)  # with the default (compact) engine
    gen_int8_quality: bool = True  # held-out loss of fp32 vs int8 (generation.int8_quality)
    gen_continuous: bool = True
    # ray: the signal pass in one process vs on a local Ray cluster of the same cores
    ray_samples: int = 96
    ray_repeats: int = 2
    ray_cpus: int = 2
    ray_shards_per_worker: int = 4
    seed: int = 0

    @staticmethod
    def quick(**over) -> Settings:
        return Settings(mode="quick", **over)

    @staticmethod
    def full(**over) -> Settings:
        base = dict(
            mode="full",
            speed_samples=128,
            speed_repeats=3,
            max_length=512,
            knn_sizes=(10_000, 100_000, 1_000_000),
            knn_extrapolate=(),
            knn_timeout_s=6 * 3600,
            knn_dense_max_bytes=64 << 30,
            judge_samples=48,
            judge_max_new_tokens=1024,  # the reference's
            judge_batch_size=16,
            det_max_length=384,
            downstream=True,
        )
        base.update(over)
        return Settings(**base)


# ----------------------------------------------------------------------------------------------
# logging


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


@contextmanager
def timer() -> Iterator[dict]:
    out: dict = {}
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# memory


def rss_bytes() -> int:
    """Resident set size of this process, read from /proc (psutil elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return int(psutil.Process().memory_info().rss)


def max_rss_bytes() -> int:
    """The process's peak RSS so far (ru_maxrss; KiB on Linux, bytes on macOS)."""
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(v if sys.platform == "darwin" else v * 1024)


class PeakRSS:
    """Peak RSS above the level at entry, sampled by a thread every ``interval`` seconds
    (plus ru_maxrss as a cross-check: a spike shorter than the interval is still caught there
    when it sets the process's all-time peak)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._maxrss0 = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            v = rss_bytes()
            if v > self.peak:
                self.peak = v
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self._maxrss0 = max_rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        v = rss_bytes()
        self.peak = max(self.peak, v)
        maxrss = max_rss_bytes()
        if maxrss > self._maxrss0:  # the all-time peak rose inside the block: it happened here
            self.peak = max(self.peak, maxrss)

    @property
    def delta(self) -> int:
        return max(self.peak - self.baseline, 0)


# ----------------------------------------------------------------------------------------------
# model and data


class ModelCache:
    """Loads the default model once per process and hands it to every section."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lm = None
        self.load_seconds: float | None = None

    @property
    def path(self) -> str:
        """The model's folder (what a Ray worker loads)."""
        from middo_pipeline.models.loading import resolve_model_path

        return resolve_model_path(self.settings.model)

    def get(self):
        if self._lm is None:
            from middo_pipeline.models.loading import load_model

            t0 = time.perf_counter()
            self._lm = load_model(
                self.settings.model, device=self.settings.device, dtype="auto", threads=self.settings.threads
            )
            self.load_seconds = time.perf_counter() - t0
            log(f"loaded {self.settings.model} on {self._lm.device} in {self.load_seconds:.1f}s")
        return self._lm


def n_params(model) -> int:
    """Parameters counted once (tied input/output embeddings are one tensor)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return int(total)


def load_seed_rows(path: Path = SEED_PATH, wait_s: float = 0.0) -> list[dict]:
    """The seed file as a list of dicts (Alpaca JSON or JSONL). ``wait_s``: poll for it that
    long when another process is still writing it."""
    deadline = time.monotonic() + wait_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(10)
    if not path.exists():
        raise FileNotFoundError(f"seed data not found at {path}")
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(rows, dict):
        rows = rows.get("data") or rows.get("samples") or []
    out = []
    for r in rows:
        if (
            not isinstance(r, dict)
            or not str(r.get("instruction") or "").strip()
            or not str(r.get("output") or "").strip()
        ):
            continue
        out.append(
            {
                "instruction": str(r["instruction"]),
                "input": str(r.get("input") or ""),
                "output": str(r["output"]),
                "category": str(r.get("category") or ""),
            }
        )
    return out


def prompts_responses(rows: list[dict]) -> tuple[list[str], list[str]]:
    from middo_pipeline.core.schema import prompt_text

    return [prompt_text(r["instruction"], r.get("input")) for r in rows], [r["output"] for r in rows]


# ----------------------------------------------------------------------------------------------
# output


def environment_info() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars and arrays plain Python."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if np is not None:
        if isinstance(obj, np.ndarray):
            return _clean(obj.tolist())
        if isinstance(obj, np.generic):
            obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: Path, data: dict) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(_clean(data), fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    return path


def settings_dict(s: Settings) -> dict:
    return asdict(s)


@dataclass
class SectionResult:
    """What a section hands back: its JSON block, rows for the summary table, and errors."""

    name: str
    data: dict = field(default_factory=dict)
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # (figure, ours, reference/bound, note)
    seconds: float = 0.0
    error: str | None = None
