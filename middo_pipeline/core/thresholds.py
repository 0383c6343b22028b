"""Statistical thresholds for the three signals: mean ± m·std, per signal and per round.

A ``ThresholdSpec`` says how the threshold of one signal is chosen in a given round, in exactly
one of two modes:

- **m** (``target_fraction is None``): threshold = mean + m·std ("above") or mean − m·std
  ("below"), mean and std (ddof=0) over the non-missing values. ``m`` is a number, or a
  per-round schedule (round 1 = first element, the last element repeats), optionally
  multiplied by ``decay ** (round − 1)`` — the paper's "dynamic learning principles": the
  selection evolves as the model gets stronger.
- **target fraction**: the threshold is placed between order statistics so that this fraction
  of the non-missing values is flagged (fewer when values tie at the boundary: the threshold
  never splits a tie).

Comparisons are strict (``value > threshold`` / ``value < threshold``), so a constant signal
(std = 0) flags nothing. Missing values (NaN) are never flagged and are left out of mean/std.
Every result carries the threshold, the m used, the mean/std and the flagged count/fraction,
ready to be shown as metadata.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ThresholdSpec", "ThresholdResult", "resolve_m", "flag_above", "flag_below", "flag_both_above"]

_DEFAULT_M = 1.0


@dataclass
class ThresholdSpec:
    m: float | list[float] | None = _DEFAULT_M
    decay: float | None = None
    target_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.target_fraction is not None:
            tf = float(self.target_fraction)
            if not (0.0 <= tf <= 1.0) or math.isnan(tf):
                raise ValueError(f"target_fraction must be within [0, 1], got {self.target_fraction!r}")
            # the default m is tolerated (it is what you get when you do not pass m at all)
            if self.m is not None and not (isinstance(self.m, (int, float)) and float(self.m) == _DEFAULT_M):
                raise ValueError("give either m (with an optional decay) or target_fraction, not both")
            if self.decay is not None:
                raise ValueError("decay applies to m; it cannot be combined with target_fraction")
            self.m = None
            self.target_fraction = tf
            return
        if self.m is None:
            raise ValueError("a ThresholdSpec needs m (a number or a per-round list) or a target_fraction")
        if isinstance(self.m, (list, tuple)):
            if len(self.m) == 0:
                raise ValueError("an m schedule needs at least one value")
            values = [float(v) for v in self.m]
            self.m = values
        else:
            values = [float(self.m)]
            self.m = values[0]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"m must be finite, got {self.m!r}")
        if self.decay is not None:
            d = float(self.decay)
            if not (math.isfinite(d) and d > 0):
                raise ValueError(f"decay must be a positive number, got {self.decay!r}")
            self.decay = d

    @property
    def mode(self) -> str:
        return "target_fraction" if self.target_fraction is not None else "m"


def resolve_m(spec: ThresholdSpec, round_number: int) -> float | None:
    """The m that applies in ``round_number`` (1-based); None in target-fraction mode."""
    if round_number < 1:
        raise ValueError(f"rounds are numbered from 1, got {round_number}")
    if spec.target_fraction is not None:
        return None
    if isinstance(spec.m, list):
        m = spec.m[min(round_number, len(spec.m)) - 1]
    else:
        m = float(spec.m)
    if spec.decay is not None:
        m *= spec.decay ** (round_number - 1)
    return float(m)


@dataclass
class ThresholdResult:
    threshold: float  # NaN when it could not be computed (no non-missing value)
    m: float | None  # None in target-fraction mode
    mean: float
    std: float
    direction: str  # "above" | "below": which side is flagged
    flagged: np.ndarray  # bool (N,)
    fraction: float  # n_flagged / N (all samples, missing included); 0 when N == 0
    n_flagged: int
    n_missing: int
    n: int = 0
    target_fraction: float | None = None

    @property
    def n_valid(self) -> int:
        return self.n - self.n_missing

    @property
    def m_equivalent(self) -> float:
        """|threshold − mean| / std: the m that gives this threshold (NaN when std is 0)."""
        if not (math.isfinite(self.threshold) and self.std > 0):
            return float("nan")
        return abs(self.threshold - self.mean) / self.std

    def as_metadata(self) -> dict:
        """Plain floats/ints/strings for Dagster metadata (no None values)."""
        meta = {
            "threshold": float(self.threshold),
            "selection": "target_fraction" if self.target_fraction is not None else "m",
            "direction": str(self.direction),
            "mean": float(self.mean),
            "std": float(self.std),
            "n_flagged": int(self.n_flagged),
            "flagged_fraction": float(self.fraction),
            "n_missing": int(self.n_missing),
            "n_samples": int(self.n),
        }
        if self.m is not None:
            meta["m"] = float(self.m)
        else:
            meta["target_fraction"] = float(self.target_fraction)
            meta["m_equivalent"] = float(self.m_equivalent)
        return meta


def _as_values(values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    return arr


def _fraction_threshold(valid: np.ndarray, fraction: float, direction: str) -> float:
    """A threshold that flags round(fraction·n) of ``valid`` with the strict comparison."""
    n = valid.size
    k = int(round(fraction * n))
    s = np.sort(valid)
    if direction == "above":
        s = s[::-1]  # descending: the k largest are flagged
        if k <= 0:
            return float(s[0])  # nothing is > the maximum
        if k >= n:
            return float(np.nextafter(s[-1], -np.inf))
        return float((s[k - 1] + s[k]) / 2) if s[k - 1] != s[k] else float(s[k - 1])
    if k <= 0:
        return float(s[0])  # nothing is < the minimum
    if k >= n:
        return float(np.nextafter(s[-1], np.inf))
    return float((s[k - 1] + s[k]) / 2) if s[k - 1] != s[k] else float(s[k - 1])


def _flag(values, spec: ThresholdSpec, round_number: int, direction: str) -> ThresholdResult:
    arr = _as_values(values)
    missing = np.isnan(arr)
    valid = arr[~missing]
    m = resolve_m(spec, round_number)
    n = int(arr.size)
    if valid.size == 0:
        return ThresholdResult(
            threshold=float("nan"),
            m=m,
            mean=float("nan"),
            std=float("nan"),
            direction=direction,
            flagged=np.zeros(n, dtype=bool),
            fraction=0.0,
            n_flagged=0,
            n_missing=int(missing.sum()),
            n=n,
            target_fraction=spec.target_fraction,
        )
    mean = float(valid.mean())
    std = float(valid.std(ddof=0))
    if spec.target_fraction is not None:
        threshold = _fraction_threshold(valid, spec.target_fraction, direction)
    else:
        threshold = mean + m * std if direction == "above" else mean - m * std
    with np.errstate(invalid="ignore"):
        flagged = (arr > threshold) if direction == "above" else (arr < threshold)
    flagged &= ~missing
    n_flagged = int(flagged.sum())
    return ThresholdResult(
        threshold=float(threshold),
        m=m,
        mean=mean,
        std=std,
        direction=direction,
        flagged=flagged,
        fraction=n_flagged / n if n else 0.0,
        n_flagged=n_flagged,
        n_missing=int(missing.sum()),
        n=n,
        target_fraction=spec.target_fraction,
    )


def flag_above(values: Sequence[float] | np.ndarray, spec: ThresholdSpec, round_number: int = 1) -> ThresholdResult:
    """Flag values > mean + m·std (or the top target fraction)."""
    return _flag(values, spec, round_number, "above")


def flag_below(values: Sequence[float] | np.ndarray, spec: ThresholdSpec, round_number: int = 1) -> ThresholdResult:
    """Flag values < mean − m·std (or the bottom target fraction)."""
    return _flag(values, spec, round_number, "below")


def flag_both_above(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, spec: ThresholdSpec, round_number: int = 1
) -> tuple[ThresholdResult, ThresholdResult, np.ndarray]:
    """The complexity rule: hard when BOTH a > its own threshold AND b > its own threshold
    (a = loss before training, b = loss after). Returns (result_a, result_b, combined mask).

    In target-fraction mode each signal gets its own top fraction, and the combined mask is
    their intersection (so it flags at most that fraction)."""
    ra = flag_above(a, spec, round_number)
    rb = flag_above(b, spec, round_number)
    if ra.flagged.shape != rb.flagged.shape:
        raise ValueError(f"both signals need the same length, got {ra.n} and {rb.n}")
    return ra, rb, ra.flagged & rb.flagged
