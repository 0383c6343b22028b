"""The base-model readout cache: keys by text and max_length, one file per model identity,
cached and computed rows assembled in row order, a damaged file is recomputed, not trusted."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest

from middo_pipeline.core import readout_cache as rc


def test_keys_follow_text_and_max_length():
    a = rc.row_keys(["p1", "p2"], ["r1", None], 384)
    assert a == rc.row_keys(["p1", "p2"], ["r1", None], 384)
    assert len(set(a)) == 2
    assert a != rc.row_keys(["p1", "p2"], ["r1", None], 512)
    assert rc.row_keys(["p1"], ["r1x"], 384)[0] != a[0]
    with pytest.raises(ValueError):
        rc.row_keys(["p1"], [], 384)


def test_lookup_add_and_assemble_in_row_order(tmp_path):
    cache = rc.BaseReadoutCache(tmp_path, "m1")
    keys = rc.row_keys(["a", "b", "c"], ["x", "y", "z"], 64)
    assert cache.lookup(keys) == {}
    _, missing = rc.split_hits(keys, {})
    out, new = rc.assemble(
        keys,
        {},
        missing,
        {"loss_before": np.array([1.0, 2.0, 3.0]), "loss_unconditional": np.array([4.0, np.nan, 6.0])},
    )
    cache.add(new)
    # a later round: one new sample between two kept ones
    keys2 = [keys[2], rc.row_keys(["d"], ["w"], 64)[0], keys[0]]
    hits = cache.lookup(keys2)
    found, missing2 = rc.split_hits(keys2, hits)
    assert found == [0, 2] and missing2 == [1]
    out2, new2 = rc.assemble(
        keys2, hits, missing2, {"loss_before": np.array([9.0]), "loss_unconditional": np.array([8.0])}
    )
    assert out2["loss_before"].tolist() == [3.0, 9.0, 1.0]
    assert out2["loss_unconditional"].tolist() == [6.0, 8.0, 4.0]
    assert new2["key"].to_list() == [keys2[1]]
    cache.add(new2)
    assert len(cache.lookup(keys + keys2)) == 4
    # NaN (no response token) survives the round trip
    assert np.isnan(rc.assemble([keys[1]], cache.lookup([keys[1]]), [], {})[0]["loss_unconditional"][0])
    # another model identity shares nothing
    assert rc.BaseReadoutCache(tmp_path, "m2").lookup(keys) == {}


def test_damaged_cache_is_recomputed(tmp_path):
    cache = rc.BaseReadoutCache(tmp_path, "m1")
    cache.path.write_bytes(b"not parquet")
    assert cache.lookup(["k"]) == {}
    cache.add(pl.DataFrame({"key": ["k"], "loss_before": [1.0], "loss_unconditional": [2.0]}))
    assert cache.lookup(["k"])["k"]["loss_before"] == 1.0


def test_model_identity_changes_with_the_files_and_the_load_settings(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"1234")
    a = rc.model_identity("m", str(folder), {"dtype": "auto"})
    assert a == rc.model_identity("m", str(folder), {"dtype": "auto"})
    assert a != rc.model_identity("m", str(folder), {"dtype": "bfloat16"})
    (folder / "model.safetensors").write_bytes(b"12345")  # replaced in place
    b = rc.model_identity("m", str(folder), {"dtype": "auto"})
    assert b != a
    st = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert rc.model_identity("m", str(folder), {"dtype": "auto"}) != b
    assert rc.model_identity("org/hub-model", "org/hub-model") == rc.model_identity("org/hub-model", "org/hub-model")
