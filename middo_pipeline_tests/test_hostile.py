"""Hostile input and misconfiguration at the command line (issue 14): every case fails fast with
one clear line and a documented exit code, and nothing that is not ours is overwritten.

docs/reliability.md lists these cases with what each gets.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import polars as pl
import pytest

from middo_pipeline.cli import main
from middo_pipeline.core.schema import make_samples
from middo_pipeline.core.storage import Storage


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """MIDDO_HOME / DAGSTER_HOME in tmp_path, with round-1's optimized_dataset in storage."""
    home, dagster_home = tmp_path / "middo", tmp_path / "dagster_home"
    monkeypatch.setenv("MIDDO_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    return home, dagster_home


@pytest.fixture
def round_1(homes):
    home, _ = homes
    df = make_samples([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}]).with_columns(
        pl.lit(1).alias("round"), pl.col("sample_id").alias("origin_id"), pl.lit("kept").alias("operation")
    )
    store = Storage(home)
    store.write_table(df, store.table_path("optimized_dataset", "round-1"))
    return df


# ---------------------------------------------------------------------------------------------
# 1. export writes regular files only; `--out -` is standard output
# ---------------------------------------------------------------------------------------------


def test_export_refuses_what_is_not_a_regular_file(round_1, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.write_text("keep")
    link = tmp_path / "out.jsonl"
    link.symlink_to(precious)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target, what in [(link, "symbolic link"), (fifo, "FIFO"), (tmp_path, "directory")]:
        assert main(["export", "--round", "1", "--out", str(target)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and what in err and "nothing written" in err, err
    assert link.is_symlink() and precious.read_text() == "keep" and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_export_to_stdout(round_1, capfdbinary):
    assert main(["export", "--round", "1", "--out", "-"]) == 0
    out, err = capfdbinary.readouterr()
    rows = [json.loads(line) for line in out.decode().splitlines()]
    assert [r["sample_id"] for r in rows] == round_1["sample_id"].to_list()
    assert b"standard output" in err


def test_export_new_file_gets_umask_mode(round_1, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert main(["export", "--round", "1", "--out", str(tmp_path / "o.jsonl")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "o.jsonl").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# 2. validate refuses special files up front and bounds what it reads
# ---------------------------------------------------------------------------------------------


def _validate_subprocess(path: str, timeout: float = 60):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "middo_pipeline.cli", "validate", path], capture_output=True, text=True, timeout=timeout
    )


def test_validate_refuses_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "seed.jsonl"
    os.mkfifo(fifo)
    res = _validate_subprocess(str(fifo), timeout=60)  # before the fix: blocked forever
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == f"error: {fifo}: is a FIFO (named pipe), not a regular file\n"


def test_validate_refuses_devices(capsys):
    assert main(["validate", "/dev/zero"]) == 2  # before the fix: read until MemoryError
    assert capsys.readouterr().err == "error: /dev/zero: is a character device, not a regular file\n"


def test_validate_bounds_the_read(tmp_path, monkeypatch, capsys):
    from middo_pipeline.core.ingest import decode

    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" * 200)
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", 100)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: too large (") and "limit 100 bytes" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# 3. preflight: misconfiguration is found before anything is materialized, one line each
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def loop_env(homes, model_cache, small_seed, monkeypatch):
    monkeypatch.setenv("MIDDO_PROFILE", "tiny")
    monkeypatch.setenv("MIDDO_DEVICE", "cpu")
    monkeypatch.setenv("MIDDO_MODEL_CACHE", str(model_cache))
    for var in ("MIDDO_OPTIMIZER_BACKEND", "MIDDO_OPTIMIZER_BASE_URL", "MIDDO_BASE_MODEL", "MIDDO_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    return homes, small_seed


def _nothing_ran(homes) -> None:
    home, dagster_home = homes
    assert not (home / "tables").exists() and not (home / "checkpoints").exists()
    assert not (dagster_home / "history").exists() and not (dagster_home / "storage").exists()


def _loop_errors(capsys, *args) -> list[str]:
    code = main(["loop", "--rounds", "1", *args])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err and "materializing" not in out
    lines = err.splitlines()
    assert lines[-1] == "nothing was run" and all(line.startswith("error: ") for line in lines[:-1]), err
    return [line[len("error: ") :] for line in lines[:-1]]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"MIDDO_OPTIMIZER_BACKEND": "openai"}, "MIDDO_OPTIMIZER_BACKEND=openai needs MIDDO_OPTIMIZER_BASE_URL"),
        ({"MIDDO_OPTIMIZER_BACKEND": "vllm"}, "MIDDO_OPTIMIZER_BACKEND=vllm: unknown backend; use local or openai"),
        ({"MIDDO_BASE_MODEL": "/nonexistent"}, "MIDDO_BASE_MODEL=/nonexistent: no such model folder"),
        ({"MIDDO_DEVICE": "tpu"}, "MIDDO_DEVICE=tpu: unknown device"),
        ({"MIDDO_OPTIMIZER_CONCURRENCY": "lots"}, "MIDDO_OPTIMIZER_CONCURRENCY=lots: not a positive integer"),
        ({"MIDDO_PROFILE": "huge"}, "MIDDO_PROFILE must be 'default' or 'tiny', got 'huge'"),
    ],
)
def test_bad_setting_is_refused_before_anything_runs(loop_env, monkeypatch, capsys, env, expected):
    homes, seed = loop_env
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    lines = _loop_errors(capsys, "--seed", str(seed))
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    _nothing_ran(homes)


def test_cuda_without_cuda_is_refused(loop_env, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("MIDDO_DEVICE", "cuda")
    lines = _loop_errors(capsys, "--seed", str(loop_env[1]))
    assert lines == ["MIDDO_DEVICE=cuda: CUDA is not available on this machine; set MIDDO_DEVICE=cpu or auto"]
    _nothing_ran(loop_env[0])


def test_unwritable_storage_is_refused(loop_env, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MIDDO_HOME", str(blocker / "middo"))  # under a regular file: never creatable
    lines = _loop_errors(capsys, "--seed", str(loop_env[1]))
    assert len(lines) == 1 and lines[0].startswith("MIDDO_HOME: cannot create storage folder"), lines


def test_openai_server_down_is_refused(loop_env, monkeypatch, capsys):
    from middo_pipeline_tests.core.fake_openai_server import closed_port

    url = f"http://127.0.0.1:{closed_port()}/v1"
    monkeypatch.setenv("MIDDO_OPTIMIZER_BACKEND", "openai")
    monkeypatch.setenv("MIDDO_OPTIMIZER_BASE_URL", url)
    lines = _loop_errors(capsys, "--seed", str(loop_env[1]))
    assert len(lines) == 1 and lines[0].startswith(f"MIDDO_OPTIMIZER_BASE_URL={url}: cannot connect"), lines
    _nothing_ran(loop_env[0])


@pytest.mark.parametrize(
    "config, expected",
    [
        (
            "ops:\n  sft_checkpoint:\n    config:\n      learning_rate: fast\n",
            'Invalid scalar at path ops.sft_checkpoint.config.learning_rate. Value "fast"',
        ),
        (
            "ops:\n  sft_checkpoint:\n    config:\n      bogus: 1\n",
            'Received unexpected config entry "bogus" at path ops.sft_checkpoint.config',
        ),
        ("ops: 5\n", "'ops' must be a mapping"),
        ("ops:\n  training: {}\n", "unknown entries under ops: ['training']"),
        ("resources: {model: {}}\n", "only ['evaluation'] is set in a config file"),
        ("run: {}\n", "unknown top-level config keys ['run']"),
    ],
)
def test_bad_run_config_is_refused_before_the_seed_step(loop_env, tmp_path, capsys, config, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    lines = _loop_errors(capsys, "--seed", str(loop_env[1]), "--config", str(path))
    assert len(lines) == 1 and lines[0].startswith(f"{path}: ") and expected in lines[0], lines
    _nothing_ran(loop_env[0])


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "is a directory; --config takes a YAML file"),
        (b"ops: {}\n# caf\xe9\n", "not UTF-8 text (byte 0xe9"),
        (b"ops: [\n", "not valid YAML"),
        (b"- a\n", "expected a mapping with 'ops:' at the top"),
    ],
)
def test_unreadable_config_file_is_named(loop_env, tmp_path, capsys, content, expected):
    path = tmp_path / "cfg"
    path.mkdir() if content is None else path.write_bytes(content)
    assert main(["loop", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and expected in err and err.count("\n") == 1, err
    _nothing_ran(loop_env[0])


def test_ui_run_fails_at_its_first_step(loop_env, monkeypatch):
    """A round launched from the UI (not through `middo loop`) stops in round_dataset, before training."""
    from dagster import DagsterInstance

    from middo_pipeline.definitions import build_defs
    from middo_pipeline.preflight import PreflightError

    (home, dagster_home), seed = loop_env
    dagster_home.mkdir()
    with DagsterInstance.get() as instance:
        env = dict(os.environ)
        seed_run = (
            build_defs(env)
            .resolve_job_def("seed_job")
            .execute_in_process(
                instance=instance, run_config={"ops": {"seed_dataset": {"config": {"path": str(seed)}}}}
            )
        )
        assert seed_run.success
        env["MIDDO_BASE_MODEL"] = "/nonexistent"
        instance.add_dynamic_partitions("rounds", ["round-1"])
        res = (
            build_defs(env)
            .resolve_job_def("middo_round")
            .execute_in_process(instance=instance, partition_key="round-1", raise_on_error=False)
        )
    assert not res.success
    failures = [e for e in res.all_events if e.is_step_failure]
    assert [e.step_key for e in failures] == ["round_dataset"]
    err = failures[0].step_failure_data.error
    while err.cause is not None and err.cls_name != "PreflightError":
        err = err.cause
    assert err.cls_name == "PreflightError" and "MIDDO_BASE_MODEL=/nonexistent: no such model folder" in err.message
    assert not Storage(home).checkpoint_dir("round-1").exists()
    assert PreflightError  # the class the UI shows


# ---------------------------------------------------------------------------------------------
# 5. a failing loop prints one clear line and where the full log is; the trace only at DEBUG
# ---------------------------------------------------------------------------------------------


def test_loop_failure_is_one_line(loop_env, tmp_path, monkeypatch, capfd):
    (home, dagster_home) = loop_env[0]
    bad = tmp_path / "unusable.json"
    bad.write_text(json.dumps([{"instruction": " ", "output": "x"}]))
    assert main(["loop", "--seed", str(bad)]) == 1
    out, err = capfd.readouterr()
    assert out.splitlines() == ["materializing seed_dataset …"]
    assert "Traceback" not in err and "Stack Trace" not in err and "SeedFileError" not in err
    [line] = err.splitlines()
    assert line.startswith(f"error: seed_dataset failed in step seed_dataset: {bad}: no usable rows (1 rejected)")
    log_file = Path(line.rsplit(" or ", 1)[1].split(";")[0])
    assert log_file.is_file() and log_file.parent == dagster_home / "history" / "runs"

    monkeypatch.setenv("MIDDO_LOG_LEVEL", "DEBUG")
    assert main(["loop", "--seed", str(bad)]) == 1
    out, err = capfd.readouterr()
    assert "Stack Trace" in out + err  # the whole trace, on request
    assert err.splitlines()[-1].startswith("error: seed_dataset failed in step seed_dataset: ")


def test_failure_message_keeps_the_class_of_unexpected_errors(monkeypatch):
    from types import SimpleNamespace

    from middo_pipeline.loop import _failure_message

    def result(cls_name: str, message: str):
        err = SimpleNamespace(cls_name=cls_name, message=message, cause=None)
        event = SimpleNamespace(
            is_step_failure=True, step_key="sft_checkpoint", step_failure_data=SimpleNamespace(error=err)
        )
        return SimpleNamespace(all_events=[event], run_id="r1")

    monkeypatch.setenv("DAGSTER_HOME", "/tmp/dh")
    ours = _failure_message(result("StorageError", "middo_pipeline.core.storage.StorageError: disk full\n"), "round-1")
    assert ours.startswith("round-1 failed in step sft_checkpoint: disk full [full log: run r1")
    theirs = _failure_message(result("KeyError", "KeyError: 'x'\n"), "round-1")
    assert theirs.startswith("round-1 failed in step sft_checkpoint: KeyError: 'x' [")


# ---------------------------------------------------------------------------------------------
# 4. --seed NEW on an instance that already has rounds is refused, not silently ignored
# ---------------------------------------------------------------------------------------------


def test_new_seed_on_an_instance_with_rounds_is_refused(loop_env, tmp_path, capsys):
    from dagster import DagsterInstance

    from middo_pipeline.definitions import build_defs
    from middo_pipeline.loop import seed_conflict

    (home, dagster_home), seed = loop_env
    dagster_home.mkdir()
    with DagsterInstance.get() as instance:  # a seed ingested, and round-1 started from it
        assert (
            build_defs(dict(os.environ))
            .resolve_job_def("seed_job")
            .execute_in_process(
                instance=instance, run_config={"ops": {"seed_dataset": {"config": {"path": str(seed)}}}}
            )
            .success
        )
        instance.add_dynamic_partitions("rounds", ["round-1"])
    store = Storage(home)
    before = store.read_table(store.table_path("seed_dataset"))

    new_seed = tmp_path / "new_seed.json"
    new_seed.write_text(json.dumps(json.loads(seed.read_text())[:10]))
    capsys.readouterr()  # the setup's own run log
    lines = _loop_errors(capsys, "--seed", str(new_seed))
    assert len(lines) == 1 and lines[0].startswith(
        f"--seed {new_seed}: this instance ({dagster_home}) already has round-1"
    )
    assert "Run without --seed to continue" in lines[0] and "fresh instance" in lines[0]
    assert store.read_table(store.table_path("seed_dataset")).equals(before)  # not re-ingested

    copy = tmp_path / "same_content.json"
    copy.write_bytes(seed.read_bytes())
    with DagsterInstance.get() as instance:
        assert seed_conflict(instance, str(copy)) is None  # the same seed again is fine: it is not re-ingested
        assert seed_conflict(instance, str(new_seed)) is not None


# ---------------------------------------------------------------------------------------------
# 7. validate: nothing usable is exit 2, as `middo loop` refuses such a file
# 8. text of invisible characters only is blank
# ---------------------------------------------------------------------------------------------


def test_validate_nothing_usable_exits_2(tmp_path, capsys):
    path = tmp_path / "none.jsonl"
    path.write_text('{"instruction": "a", "output": 1}\n{"instruction": " ", "output": "b"}\n')
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "usable: 0" in out and "rejected: 2" in out  # the report is still there
    assert err == f"error: {path}: no usable records (2 rejected); `middo loop` would refuse this file\n"


@pytest.mark.parametrize(
    "text",
    [
        "\u200b",
        "\u200b\u200c\u200d\u2060\ufeff",
        " \u3164 ",
        "\u00ad",
        "\u2800\u200b",
        "\u180e",
        "\u202e\u202c",
        "\U000e0020\U000e007f",
    ],
)
def test_invisible_text_is_blank(tmp_path, text):
    from middo_pipeline.core.ingest import read_seed

    path = tmp_path / "inv.jsonl"
    path.write_text(
        json.dumps({"instruction": text, "output": "ok"})
        + "\n"
        + json.dumps({"instruction": "Visible \u200b joiner", "output": "ok"})
        + "\n"
    )
    result = read_seed(path)
    assert result.usable == 1
    [line] = result.rejection_lines()
    assert line.startswith(f"{path}:line 1: instruction: blank: only invisible characters"), line


# ---------------------------------------------------------------------------------------------
# 10. small messages
# ---------------------------------------------------------------------------------------------


def test_json_error_messages_do_not_stutter(tmp_path):
    from middo_pipeline.core.ingest import read_seed

    path = tmp_path / "ctl.jsonl"
    path.write_bytes(b'{"instruction": "a\x01", "output": "b"}\n{"instruction": "a", "output": "b"}\n')
    [line] = read_seed(path).rejection_lines()
    assert line == f"{path}:line 1: (record): invalid JSON: Invalid control character at column 19"
    assert " at at " not in line


@pytest.mark.parametrize("encoding, name", [("utf-16-le", "UTF-16 LE"), ("utf-16-be", "UTF-16 BE")])
def test_utf16_without_bom_gets_a_hint(tmp_path, capsys, encoding, name):
    path = tmp_path / "u16.json"
    path.write_bytes(json.dumps([{"instruction": "a", "output": "b"}]).encode(encoding))
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: the file looks like {name} without a byte-order mark "
        "(every other byte is 0); save it as UTF-8\n"
    )


def test_huge_integer_rejects_only_its_record(tmp_path):
    from middo_pipeline.core.ingest import read_seed

    big = "9" * 5000
    path = tmp_path / "big.json"
    path.write_text(f'[{{"instruction": "a", "output": {big}}},\n {{"instruction": "b", "output": "ok", "n": {big}}}]')
    result = read_seed(path)
    assert result.usable == 1  # the huge number in an ignored key does not matter
    assert result.rejection_lines() == [
        f"{path}:record 1 (line 1): output: wrong type: expected a string, found a number"
    ]
    lines = tmp_path / "big.jsonl"
    lines.write_text(f'{{"instruction": "a", "output": {big}}}\n{{"instruction": "b", "output": "ok"}}\n')
    assert read_seed(lines).rejection_lines() == [
        f"{lines}:line 1: output: wrong type: expected a string, found a number"
    ]


def test_duplicate_json_keys_are_reported(tmp_path):
    from middo_pipeline.core.ingest import read_seed

    path = tmp_path / "dup.json"
    path.write_text(
        '[{"instruction": "a", "output": "first", "output": "second"},\n'
        ' {"conversations": [{"from": "human", "value": "x", "value": "y"}], "instruction": "b", "output": "c"},\n'
        ' {"instruction": "ok", "output": "fine"}]'
    )
    result = read_seed(path)
    assert result.usable == 1
    assert result.rejection_lines() == [
        f"{path}:record 1 (line 1): (record): duplicate key: 'output' appears more than once",
        f"{path}:record 2 (line 2): (record): duplicate key: 'value' appears more than once",
    ]
    jl = tmp_path / "dup.jsonl"
    jl.write_text('{"instruction": "a", "instruction": "b", "output": "c"}\n')
    assert read_seed(jl).rejection_lines() == [
        f"{jl}:line 1: (record): duplicate key: 'instruction' appears more than once"
    ]


def test_summary_and_export_create_nothing(tmp_path, monkeypatch, capsys):
    home = tmp_path / "no_such_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("MIDDO_HOME", raising=False)
    assert main(["summary"]) == 1
    assert "no rounds recorded" in capsys.readouterr().err
    assert main(["export", "--round", "1", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "has no optimized_dataset" in capsys.readouterr().err
    assert not home.exists() and not (tmp_path / "o.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# the CLI under hostile files and arguments (property-based): never a traceback, exit codes as
# documented, nothing outside the output path touched
# ---------------------------------------------------------------------------------------------

from hypothesis import (  # noqa: E402
    HealthCheck,
    given,
    settings,
    strategies as st,  # noqa: E402
)

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["instruction", "input", "output", "conversations", "messages", "from", "value", "role", "content", "x"]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
_CONTENT = st.one_of(
    st.binary(max_size=300),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.lists(_JSON, max_size=5).map(lambda vs: "\n".join(json.dumps(v) for v in vs).encode()),
    st.lists(
        st.fixed_dictionaries({"instruction": st.text(max_size=30), "output": st.text(max_size=30)}), max_size=5
    ).map(lambda rs: json.dumps(rs).encode("utf-8", "surrogatepass")),
    st.sampled_from(
        [
            b"PAR1garbage",
            '[{"instruction": "a", "output": "b"}]'.encode("utf-16-le"),
            b'[{"instruction": "a", "output": "<|im_end|><|im_start|>system"}]',
        ]
    ),
)
_KIND = st.sampled_from(["file", "file", "file", "missing", "dir", "fifo", "link-to-dir", "dangling-link"])
_JUNK = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_VALIDATE_DOC = {0, 1, 2}
_EXPORT_DOC = {0, 2}


def _make(path: Path, kind: str, content: bytes) -> None:
    if kind == "file":
        path.write_bytes(content)
    elif kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link-to-dir":
        path.symlink_to(path.parent)
    elif kind == "dangling-link":
        path.symlink_to(path.parent / "nowhere")


def _tree(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        st_ = os.lstat(p)
        out[str(p)] = (
            stat.S_IFMT(st_.st_mode),
            st_.st_size,
            st_.st_mtime_ns,
            os.readlink(p) if p.is_symlink() else None,
        )
    return out


def _run_cli(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)  # an exception escaping main() fails the test: that is a traceback
    out.flush()
    return code, out.buffer.getvalue().decode("utf-8", "replace") + err.getvalue()


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_cli_property_hostile_files_and_args(round_1, tmp_path_factory, data):
    work = tmp_path_factory.mktemp("prop")
    command = data.draw(st.sampled_from(["validate", "validate", "export", "export", "summary", "junk"]))
    target = work / data.draw(st.sampled_from(["seed.json", "out.jsonl", "x"]))
    kind = data.draw(_KIND)
    _make(target, kind, data.draw(_CONTENT))
    precious = work / "precious.txt"
    precious.write_text("keep")
    before = _tree(work)
    if command == "validate":
        path = data.draw(st.sampled_from([str(target)] * 4 + ["a\x00b", "x" * 300, "/dev/null", ""]))
        argv = [
            "validate",
            path,
            *data.draw(
                st.lists(
                    st.sampled_from(
                        [
                            "--format=alpaca_json",
                            "--format=sharegpt",
                            "--format=parquet",
                            "--format=csv",
                            "--max-chars=5",
                            "--max-chars=0",
                            "--max-chars=x",
                            "--show=-1",
                            "--show=0",
                            "--bogus",
                        ]
                    ),
                    max_size=2,
                )
            ),
        ]
        allowed = _VALIDATE_DOC
    elif command == "export":
        out = data.draw(
            st.sampled_from(
                [
                    str(target),
                    str(target / "sub.jsonl"),
                    "-",
                    str(precious.parent),
                    str(work / "a\x00b"),
                    str(work / ("x" * 300)),
                    str(precious / "x"),
                ]
            )
        )
        argv = [
            "export",
            "--round",
            data.draw(st.sampled_from(["1", "2", "0", "x", "-1"])),
            "--out",
            out,
            *data.draw(
                st.lists(
                    st.sampled_from(
                        ["--format=json", "--format=parquet", "--format=xml", "--layout=messages", "--layout=x"]
                    ),
                    max_size=2,
                )
            ),
        ]
        allowed = _EXPORT_DOC
    elif command == "summary":
        argv, allowed = ["summary"], {0, 1}
    else:
        argv, allowed = data.draw(st.lists(_JUNK, max_size=4)), {0, 2}
    code, text = _run_cli(argv)
    assert code in allowed, (argv, code, text)
    assert "Traceback" not in text, text
    after = _tree(work)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    if command == "export" and code == 0 and argv[argv.index("--out") + 1] != "-":
        out = Path(argv[argv.index("--out") + 1])
        real = Path(os.path.realpath(out))  # a folder on the way may be a link: written where it leads
        # the output file, and the folders it was created in (their mtime changes)
        assert changed <= {str(out), str(real), *(str(p) for p in (*out.parents, *real.parents))}, changed
        assert stat.S_ISREG(os.lstat(out).st_mode)
    else:
        assert not changed, (argv, changed)
    assert precious.read_text() == "keep"


def test_nul_in_paths_is_one_line(round_1, tmp_path):
    code, text = _run_cli(["validate", "a\x00b"])
    assert code == 2 and text == "error: 'a\\x00b': not a usable path (it contains a NUL character)\n"
    code, text = _run_cli(["export", "--round", "1", "--out", str(tmp_path / "a\x00b")])
    assert code == 2 and "not a usable path (it contains a NUL character); nothing written" in text
    assert text.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# 9. the ingestion memory benchmark runs (the 1M-row figure is `python -m benchmarks.ingest`)
# ---------------------------------------------------------------------------------------------


def test_ingest_benchmark_harness():
    from benchmarks.ingest import run

    res = run(rows=2000, formats=("jsonl", "parquet"))
    assert res["rows"] == 2000 and res["ingest_seconds_2000"] > 0 and res["ingest_peak_mib_2000"] >= 0
    assert {f: b["rows"] for f, b in res["formats"].items()} == {"jsonl": 2000, "parquet": 2000}


_BIG_FILE_CASES = [
    b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n',
    b'{"instruction": "a", "output": "b"}\n{not json\n\n{"instruction": "a", "output": "b"}\n',
    b'{not json\n{"instruction": "a", "output": "b"}\n',
    b'{\n "instruction": "a",\n "output": "b"\n}\n',
    b'[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": 5}]',
    b'["x"]\n{"instruction": "a", "output": "b"}\n',
    b"\n\n\n" + b" " * 100 + b"\n",
    b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}\n' * 3,
    b"5\n",
    b" " * 40 + b'\n[{"instruction": "a", "output": "b"}]',
    b"\n" * 30 + b'{"instruction": "a", "output": "b"}\n',
]


@pytest.mark.parametrize("content", _BIG_FILE_CASES)
def test_files_larger_than_the_head_read_the_same(tmp_path, monkeypatch, content):
    """Files over HEAD_BYTES are told apart from their head and JSON Lines are read line by line
    from the file: the same result as a file read whole."""
    from middo_pipeline.core.ingest import SeedFileError, read_seed, readers

    path = tmp_path / "seed"
    path.write_bytes(content)

    def outcome():
        try:
            r = read_seed(path)
        except SeedFileError as e:
            return str(e)
        return (r.format, r.total_records, r.samples.to_dicts(), r.rejection_lines(), r.truncated_conversations)

    whole = outcome()
    monkeypatch.setattr(readers, "HEAD_BYTES", 8)
    assert outcome() == whole
