"""``middo validate``: output lines and exit codes 0 (clean) / 1 (rows rejected) / 2 (unusable, or no row usable)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from middo_pipeline.cli import main

GOOD = [
    {"instruction": "Name a primary colour.", "output": "Red."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def clean_file(tmp_path) -> Path:
    path = tmp_path / "clean.json"
    path.write_text(json.dumps(GOOD, indent=2))
    return path


@pytest.fixture
def dirty_file(tmp_path) -> Path:
    return write_jsonl(
        tmp_path / "dirty.jsonl",
        [
            GOOD[0],
            "{not json",
            {"instruction": "a", "output": 7},
            GOOD[0],
            {"instruction": "b", "output": 8},
            GOOD[1],
        ],
    )


def test_clean_exit_0(clean_file, capsys):
    assert main(["validate", str(clean_file)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{clean_file}: format alpaca_json (detected)",
        "records: 2",
        "usable: 2",
        "rejected: 0",
    ]
    assert err == ""


def test_rejected_rows_exit_1(dirty_file, capsys):
    assert main(["validate", str(dirty_file)]) == 1
    out, err = capsys.readouterr()
    f = str(dirty_file)
    assert out.splitlines() == [
        f"{f}: format alpaca_jsonl (detected)",
        "records: 6",
        "usable: 2",
        "rejected: 4",
        f"{f}:line 2: (record): invalid JSON: Expecting property name enclosed in double quotes at column 2",
        f"{f}:line 3: output: wrong type: expected a string, found a number",
        f"{f}:line 4: (record): duplicate: same content as line 1",
        f"{f}:line 5: output: wrong type: expected a string, found a number",
        "rejected by reason:",
        "  2  wrong type",
        "  1  duplicate",
        "  1  invalid JSON",
    ]
    assert err == ""


def test_show_limits_listing(dirty_file, capsys):
    assert main(["validate", str(dirty_file), "--show", "1"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert sum(":line " in line for line in out) == 1
    assert "... and 3 more rejected records (--show N lists more, --show -1 all)" in out
    assert main(["validate", str(dirty_file), "--show", "0"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert not any(":line " in line for line in out)
    assert "rejected by reason:" in out
    assert main(["validate", str(dirty_file), "--show", "-1"]) == 1
    assert capsys.readouterr().out.count(":line ") == 4


def test_array_locations(tmp_path, capsys):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([GOOD[0], {"instruction": " ", "output": "x"}], indent=2))
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:record 2 (line 6): instruction: blank: empty after stripping whitespace\n" in out


def test_max_chars(clean_file, capsys):
    assert main(["validate", str(clean_file), "--max-chars", "20"]) == 2  # no record usable
    out = capsys.readouterr().out
    assert f"{clean_file}:record 1 (line 2): (record): too long: 26 characters (limit 20)" in out
    assert "  2  too long" in out


def test_sharegpt_shows_truncated(tmp_path, capsys):
    conv = {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Bye"},
        ]
    }
    path = write_jsonl(tmp_path / "c.jsonl", [conv])
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: format sharegpt (detected)"
    assert "truncated conversations (first pair kept): 1" in out


def test_format_override(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}])
    assert main(["validate", str(path)]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert main(["validate", str(path), "--format", "alpaca_jsonl"]) == 2  # read, but no record usable
    out = capsys.readouterr().out
    assert f"{path}: format alpaca_jsonl (given)" in out
    assert f"{path}:line 1: instruction: missing field" in out


def test_parquet(tmp_path, capsys):
    path = tmp_path / "s.parquet"
    pl.DataFrame({"instruction": ["a", "b"], "output": ["x", None]}).write_parquet(path)
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:record 2: output: wrong type: expected a string, found null" in out


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b'[\n {"instruction": "a",\n', "truncated JSON at line 2, column 22 (file ends inside an object)"),
        (b'[{"instruction": "\xff"}]', "invalid UTF-8: byte 0xff at line 1, column 19"),
        (b'{\n "instruction": "a",\n "output": "b"\n}\n', "expected a JSON array of objects, found a top-level object"),
    ],
)
def test_unusable_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: {path}: {message}\n"
    assert "Traceback" not in err


def test_missing_file_exit_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.json")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.json'}: file not found\n"


def test_usage_errors_exit_2(capsys, clean_file):
    assert main([]) == 2
    assert "validate" in capsys.readouterr().err
    assert main(["validate"]) == 2
    assert main(["validate", str(clean_file), "--format", "csv"]) == 2
    assert main(["validate", str(clean_file), "--max-chars", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_cli_module_is_light():
    code = "import sys, middo_pipeline.cli; print(any(m in sys.modules for m in ('torch', 'dagster', 'polars')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_console_script(dirty_file, clean_file):
    script = Path(sys.executable).parent / "middo"
    if not script.exists():
        found = shutil.which("middo")
        if found is None:
            pytest.skip("the middo console script is not installed (pip install -e .)")
        script = Path(found)
    ok = subprocess.run([str(script), "validate", str(clean_file)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "usable: 2" in ok.stdout
    dirty = subprocess.run([str(script), "validate", str(dirty_file)], capture_output=True, text=True)
    assert dirty.returncode == 1
    assert f"{dirty_file}:line 3: output: wrong type" in dirty.stdout
    missing = subprocess.run([str(script), "validate", str(dirty_file) + ".nope"], capture_output=True, text=True)
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr


def test_ui_hint_is_the_script_in_a_checkout_and_dagster_dev_in_a_wheel(tmp_path, monkeypatch):
    from middo_pipeline import cli

    assert cli.ui_command() == "bash scripts/ui.sh"  # this checkout has scripts/ui.sh
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "middo_pipeline" / "cli.py"))
    assert cli.ui_command().startswith("dagster dev -m middo_pipeline.definitions")
