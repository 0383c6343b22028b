"""Where everything lives on disk, and how it is written safely.

One root folder holds every table (Parquet), checkpoint, plot and cache of the pipeline:

    <root>/tables/<asset>.parquet                (unpartitioned assets)
    <root>/tables/<asset>/<partition>.parquet    (one file per round partition)
    <root>/checkpoints/<partition>/            (a transformers-loadable model folder)
    <root>/cache/                              (optimizer completion cache, converted models)

The root is ``$MIDDO_HOME`` when set, else ``$DAGSTER_HOME/middo`` when ``DAGSTER_HOME`` is
set, else ``./.middo`` (git-ignored). Every write goes to a temporary name in the same folder
and is renamed into place, so a crash never leaves a partial file that looks complete.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
from filelock import FileLock

from middo_pipeline.atomic import atomic_path

UNPARTITIONED = "all"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StorageError(RuntimeError):
    """Storage cannot be used (unwritable, disk full, missing input)."""


def default_root() -> Path:
    if os.environ.get("MIDDO_HOME"):
        return Path(os.environ["MIDDO_HOME"])
    if os.environ.get("DAGSTER_HOME"):
        return Path(os.environ["DAGSTER_HOME"]) / "middo"
    return Path.cwd() / ".middo"


def safe_name(name: str) -> str:
    """A path component derived from user input: letters, digits, '.', '_' and '-' only."""
    if not _SAFE.fullmatch(name) or name in (".", ".."):  # fullmatch: "$" alone lets a trailing "\n" in
        raise ValueError(f"unsafe name for a path component: {name!r}")
    return name


class Storage:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_root()

    # -- paths -----------------------------------------------------------------------------
    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    def table_path(self, asset: str, partition: str | None = None) -> Path:
        """The same layout as Dagster's UPathIOManager uses (see ``middo_pipeline.io``)."""
        if partition is None:
            return self.tables_dir / f"{safe_name(asset)}.parquet"
        return self.tables_dir / safe_name(asset) / f"{safe_name(partition)}.parquet"

    def checkpoint_dir(self, partition: str) -> Path:
        return self.root / "checkpoints" / safe_name(partition)

    def checkpoint_ready(self, partition: str) -> bool:
        """Whether the partition's checkpoint folder holds a loadable model (its config.json)."""
        return (self.checkpoint_dir(partition) / "config.json").exists()

    def artifact_dir(self, asset: str, partition: str | None = None) -> Path:
        return self.root / "artifacts" / safe_name(asset) / safe_name(partition or UNPARTITIONED)

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def lock(self, asset: str, partition: str | None = None) -> FileLock:
        """An inter-process lock for one asset partition (two runs of one round serialize)."""
        path = self.root / "locks" / f"{safe_name(asset)}.{safe_name(partition or UNPARTITIONED)}.lock"
        self.ensure_dir(path.parent)
        return FileLock(str(path))

    # -- writes ----------------------------------------------------------------------------
    def ensure_dir(self, path: Path) -> Path:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create storage folder {path}: {exc.strerror or exc}") from exc
        if not os.access(path, os.W_OK):
            raise StorageError(f"storage folder {path} is not writable (set MIDDO_HOME to a writable folder)")
        return path

    @contextmanager
    def atomic_path(self, final: Path, *, is_dir: bool = False) -> Iterator[Path]:
        """Yield a temporary path beside ``final``; on success rename it into place."""
        self.ensure_dir(final.parent)
        try:
            with atomic_path(final, is_dir=is_dir) as tmp:
                yield tmp
        except OSError as exc:
            raise _storage_error(exc, final) from exc

    def write_table(self, df: pl.DataFrame, path: Path) -> Path:
        with self.atomic_path(path) as tmp:
            try:
                df.write_parquet(tmp)
            except OSError as exc:
                raise _storage_error(exc, path) from exc
        return path

    def read_table(self, path: Path, *, what: str | None = None) -> pl.DataFrame:
        if not path.exists():
            raise StorageError(f"{what or 'table'} not found at {path}")
        return pl.read_parquet(path)


def _storage_error(exc: OSError, path: Path) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"disk full while writing {path}: free space or set MIDDO_HOME elsewhere")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"cannot write {path}: permission denied (set MIDDO_HOME to a writable folder)")
    return StorageError(f"cannot write {path}: {exc.strerror or exc}")
