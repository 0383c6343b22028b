"""Parquet tables through Dagster's UPathIOManager, laid out by ``core.storage.Storage``.

Every DataFrame an asset returns is written atomically (temporary file + rename) to
``<root>/tables/<asset>[/<round>].parquet``; the same path is what ``Storage.table_path``
returns, so code outside Dagster (the CLI, the next round) finds the same files.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from dagster import ConfigurableIOManagerFactory, InputContext, OutputContext, UPathIOManager
from pydantic import Field
from upath import UPath

from middo_pipeline.core.storage import Storage


class PolarsParquetIOManager(UPathIOManager):
    extension = ".parquet"

    def __init__(self, storage: Storage):
        self.storage = storage
        super().__init__(base_path=UPath(storage.tables_dir))

    def make_directory(self, path: UPath) -> None:
        # through Storage: an unwritable root fails with StorageError naming the folder and the fix
        self.storage.ensure_dir(Path(path))

    def dump_to_path(self, context: OutputContext, obj: pl.DataFrame, path: UPath) -> None:
        if not isinstance(obj, pl.DataFrame):
            raise TypeError(
                f"{context.asset_key.to_user_string()} returned {type(obj).__name__}, expected a polars DataFrame"
            )
        self.storage.write_table(obj, path)

    def load_from_path(self, context: InputContext, path: UPath) -> pl.DataFrame:
        if not path.exists():
            raise FileNotFoundError(
                f"{context.upstream_output.asset_key.to_user_string() if context.upstream_output else 'input'} "
                f"has no stored table at {path}: materialize it first"
            )
        return pl.read_parquet(str(path))


class ParquetIOManager(ConfigurableIOManagerFactory):
    """Tables as Parquet under the storage root (``$MIDDO_HOME``, ``$DAGSTER_HOME/middo`` or ``./.middo``)."""

    root: str | None = Field(default=None, description="Storage root; default from MIDDO_HOME / DAGSTER_HOME")

    def create_io_manager(self, context) -> PolarsParquetIOManager:
        return PolarsParquetIOManager(Storage(self.root))
