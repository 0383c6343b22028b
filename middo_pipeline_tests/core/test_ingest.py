"""Seed ingestion: every reader, format detection, every kind of bad record, whole-file errors,
and properties (nothing but SeedFileError escapes; every record is accounted for)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from middo_pipeline.core.ingest import (
    FORMATS,
    IngestResult,
    SeedFileError,
    detect_format,
    read_seed,
    reason_kind,
)
from middo_pipeline.core.schema import QUARANTINE_SCHEMA, SAMPLE_SCHEMA, make_sample_id

ALPACA = [
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat", "category": "mt"},
    {"instruction": "Add the numbers.", "output": "5"},  # no input key at all
]


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def only_rejection(result: IngestResult) -> dict:
    assert result.quarantine.height == 1, result.quarantine
    return result.quarantine.row(0, named=True)


def assert_conserved(result: IngestResult) -> None:
    assert result.total_records == result.samples.height + result.quarantine.height
    assert result.samples.schema == pl.Schema(SAMPLE_SCHEMA)
    assert result.quarantine.schema == pl.Schema(QUARANTINE_SCHEMA)


# ----------------------------------------------------------------------------- readers


def test_alpaca_json(tmp_path):
    path = write(tmp_path, "seed.json", json.dumps(ALPACA, indent=2))
    result = read_seed(path)
    assert result.format == "alpaca_json"
    assert result.total_records == 3 and result.rejected == 0
    s = result.samples
    assert s["instruction"].to_list() == [r["instruction"] for r in ALPACA]
    assert s["input"].to_list() == ["", "cat", ""]
    assert s["output"].to_list() == ["Red.", "chat", "5"]
    assert s["round"].to_list() == [0, 0, 0]
    assert s["operation"].to_list() == ["seed"] * 3
    assert s["origin_id"].null_count() == 3
    assert s["sample_id"][1] == make_sample_id("Translate to French.", "cat", "chat")
    assert_conserved(result)


def test_alpaca_jsonl_with_blank_lines_and_bom(tmp_path):
    text = "\ufeff" + json.dumps(ALPACA[0]) + "\n\n   \n" + json.dumps(ALPACA[1]) + "\r\n"
    path = write(tmp_path, "seed.jsonl", text)
    result = read_seed(path)
    assert result.format == "alpaca_jsonl"
    assert result.total_records == 2 and result.usable == 2
    assert result.samples["output"].to_list() == ["Red.", "chat"]


def test_bom_tolerated_in_json_array(tmp_path):
    path = write(tmp_path, "seed.json", b"\xef\xbb\xbf" + json.dumps(ALPACA).encode())
    assert read_seed(path).usable == 3


def test_null_input_is_empty(tmp_path):
    path = write(tmp_path, "s.jsonl", jsonl({"instruction": "a", "input": None, "output": "b"}))
    assert read_seed(path).samples["input"].to_list() == [""]


def test_text_is_normalized(tmp_path):
    path = write(tmp_path, "s.jsonl", jsonl({"instruction": "  Cafe\u0301\r\nok  ", "output": "b\n"}))
    s = read_seed(path).samples
    assert s["instruction"][0] == "Caf\u00e9\nok"
    assert s["output"][0] == "b"


SHAREGPT = [
    {
        "id": "x1",
        "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "human", "value": "Capital of France?"},
            {"from": "gpt", "value": "Paris."},
            {"from": "human", "value": "And Spain?"},
            {"from": "gpt", "value": "Madrid."},
        ],
    },
    {"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]},
]


@pytest.mark.parametrize("container", ["json", "jsonl"])
def test_sharegpt(tmp_path, container):
    text = json.dumps(SHAREGPT) if container == "json" else jsonl(*SHAREGPT)
    result = read_seed(write(tmp_path, f"chat.{container}", text))
    assert result.format == "sharegpt"
    assert result.samples["instruction"].to_list() == ["Capital of France?", "Hi"]
    assert result.samples["output"].to_list() == ["Paris.", "Hello"]
    assert result.samples["input"].to_list() == ["", ""]
    assert result.truncated_conversations == 1  # the later turns of the first one
    assert result.rejected == 0


MESSAGES = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Colour of the sky?"},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "At night?"},
            {"role": "assistant", "content": "Black."},
        ]
    },
]


@pytest.mark.parametrize("container", ["json", "jsonl"])
def test_messages(tmp_path, container):
    text = json.dumps(MESSAGES) if container == "json" else jsonl(*MESSAGES)
    result = read_seed(write(tmp_path, f"m.{container}", text))
    assert result.format == "messages"
    assert result.samples["instruction"].to_list() == ["2+2?", "Colour of the sky?"]
    assert result.samples["output"].to_list() == ["4", "Blue."]
    assert result.truncated_conversations == 1


def test_parquet_alpaca(tmp_path):
    path = tmp_path / "seed.bin"  # the extension is irrelevant
    pl.DataFrame({"instruction": ["a", "b", "c"], "input": [None, "x", ""], "output": ["1", None, "3"]}).write_parquet(
        path
    )
    result = read_seed(path)
    assert result.format == "parquet"
    assert result.samples["instruction"].to_list() == ["a", "c"]
    assert result.samples["input"].to_list() == ["", ""]
    row = only_rejection(result)
    assert (row["location"], row["field"], row["reason"]) == (
        "record 2",
        "output",
        "wrong type: expected a string, found null",
    )
    assert_conserved(result)


def test_parquet_sharegpt_column(tmp_path):
    path = tmp_path / "chat.parquet"
    pl.DataFrame({"conversations": [c["conversations"] for c in SHAREGPT]}).write_parquet(path)
    result = read_seed(path)
    assert result.format == "parquet"
    assert result.samples["output"].to_list() == ["Paris.", "Hello"]
    assert result.truncated_conversations == 1


def test_parquet_null_column_does_not_decide_format(tmp_path):
    path = tmp_path / "seed.parquet"
    pl.DataFrame(
        {"instruction": ["a"], "output": ["b"], "messages": [None]}, schema_overrides={"messages": pl.String}
    ).write_parquet(path)
    result = read_seed(path)
    assert result.usable == 1 and result.samples["output"].to_list() == ["b"]


def test_parquet_wrong_column_type(tmp_path):
    path = tmp_path / "seed.parquet"
    pl.DataFrame({"instruction": ["a"], "output": [7]}).write_parquet(path)
    row = only_rejection(read_seed(path))
    assert (row["location"], row["field"], row["reason"]) == (
        "record 1",
        "output",
        "wrong type: expected a string, found a number",
    )


# ----------------------------------------------------------------------------- detection


def test_detect_from_content_not_extension(tmp_path):
    assert detect_format(write(tmp_path, "a.jsonl", json.dumps(ALPACA))) == "alpaca_json"
    assert detect_format(write(tmp_path, "b.json", jsonl(*ALPACA))) == "alpaca_jsonl"
    assert detect_format(write(tmp_path, "c.txt", jsonl(*SHAREGPT))) == "sharegpt"
    assert detect_format(write(tmp_path, "d.csv", json.dumps(MESSAGES))) == "messages"
    pl.DataFrame({"instruction": ["a"], "output": ["b"]}).write_parquet(tmp_path / "e.json")
    assert detect_format(tmp_path / "e.json") == "parquet"


def test_single_line_object_is_jsonl(tmp_path):
    assert detect_format(write(tmp_path, "one.json", json.dumps(ALPACA[0]))) == "alpaca_jsonl"


def test_detection_by_majority_when_first_record_is_broken(tmp_path):
    path = write(tmp_path, "s.jsonl", jsonl({"conversation": []}, *SHAREGPT))
    result = read_seed(path)
    assert result.format == "sharegpt"
    row = only_rejection(result)
    assert (row["location"], row["field"], row["reason"]) == ("line 1", "conversations", "missing field")


def test_undecidable_keys(tmp_path):
    path = write(tmp_path, "s.jsonl", jsonl({"prompt": "a", "completion": "b"}))
    with pytest.raises(SeedFileError, match=r"cannot tell the format: .*'prompt', 'completion'"):
        detect_format(path)


def test_format_override_reports_every_record(tmp_path):
    path = write(tmp_path, "s.jsonl", jsonl({"prompt": "a", "completion": "b"}, ALPACA[0]))
    result = read_seed(path, format="alpaca_jsonl")
    assert result.format == "alpaca_jsonl" and result.usable == 1
    row = only_rejection(result)
    assert (row["location"], row["field"], row["reason"]) == ("line 1", "instruction", "missing field")


def test_format_override_sharegpt_on_alpaca_data(tmp_path):
    result = read_seed(write(tmp_path, "s.json", json.dumps(ALPACA)), format="sharegpt")
    assert result.format == "sharegpt" and result.usable == 0
    assert result.rejected_by_reason() == {"missing field": 3}
    assert set(result.quarantine["field"]) == {"conversations"}


def test_format_override_container_mismatch(tmp_path):
    lines = write(tmp_path, "s.jsonl", jsonl(*ALPACA))
    with pytest.raises(SeedFileError, match=r"invalid JSON at line 2, column 1: Extra data .*JSON Lines"):
        read_seed(lines, format="alpaca_json")
    with pytest.raises(SeedFileError, match=r"not a Parquet file"):
        read_seed(lines, format="parquet")
    pq = tmp_path / "p.parquet"
    pl.DataFrame({"instruction": ["a"], "output": ["b"]}).write_parquet(pq)
    with pytest.raises(SeedFileError, match=r"is a Parquet file, not 'alpaca_json'"):
        read_seed(pq, format="alpaca_json")


def test_jsonl_whose_first_line_is_an_array(tmp_path):
    result = read_seed(write(tmp_path, "s.jsonl", jsonl(["a"], *ALPACA)))
    assert result.format == "alpaca_jsonl" and result.usable == 3
    row = only_rejection(result)
    assert (row["location"], row["reason"]) == ("line 1", "not an object: found an array")


def test_format_override_jsonl_on_array_reads_lines(tmp_path):
    path = write(tmp_path, "s.json", json.dumps(ALPACA, indent=1))
    result = read_seed(path, format="alpaca_jsonl")
    assert result.usable == 0 and result.rejected == result.total_records
    assert set(map(reason_kind, result.quarantine["reason"])) <= {"invalid JSON", "not an object"}


def test_unknown_format_name(tmp_path):
    path = write(tmp_path, "s.json", json.dumps(ALPACA))
    with pytest.raises(SeedFileError, match=r"s.json: unknown format 'csv'; expected one of alpaca_json"):
        read_seed(path, format="csv")


def test_cli_format_list_matches():
    from middo_pipeline import cli

    assert cli.SEED_FORMATS == FORMATS


# ----------------------------------------------------------------------------- file errors


def test_missing_file(tmp_path):
    with pytest.raises(SeedFileError) as e:
        read_seed(tmp_path / "nope.json")
    assert str(e.value) == f"{tmp_path / 'nope.json'}: file not found"
    assert e.value.reason == "file not found"


def test_seed_file_error_forms_and_pickling():
    import pickle

    err = SeedFileError("data/x.json", "empty file")
    assert (str(err), err.path, err.reason) == ("data/x.json: empty file", "data/x.json", "empty file")
    wrapped = SeedFileError(f"seed file unusable: {err}")
    assert str(wrapped) == "seed file unusable: data/x.json: empty file" and wrapped.path is None
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_directory(tmp_path):
    with pytest.raises(SeedFileError, match="is a directory"):
        read_seed(tmp_path)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b" \n\t\n", "empty file (only whitespace)"),
        (b"\xef\xbb\xbf", "empty file (only whitespace)"),
        (b"[]", "the JSON array is empty (no records)"),
        (b"[\n]\n", "the JSON array is empty (no records)"),
    ],
)
def test_empty(tmp_path, content, reason):
    path = write(tmp_path, "e.json", content)
    with pytest.raises(SeedFileError) as e:
        read_seed(path)
    assert e.value.reason == reason


def test_truncated_array_inside_object(tmp_path):
    rows = [json.dumps(r) for r in ALPACA]
    text = "[\n  " + ",\n  ".join(rows) + ',\n  {"instruction": "x",\n  '
    path = write(tmp_path, "x.json", text)
    with pytest.raises(SeedFileError) as e:
        read_seed(path)
    assert str(e.value) == f"{path}: truncated JSON at line 5, column 23 (file ends inside an object)"


def test_truncated_array_between_records(tmp_path):
    path = write(tmp_path, "x.json", "[\n" + json.dumps(ALPACA[0]) + ",\n")
    with pytest.raises(SeedFileError) as e:
        read_seed(path)
    assert e.value.reason == "truncated JSON at line 2, column 74 (file ends inside an array)"


def test_truncated_array_inside_string(tmp_path):
    path = write(tmp_path, "x.json", '[\n {"instruction": "a",\n  "output": "the answ')
    with pytest.raises(SeedFileError) as e:
        read_seed(path)
    assert e.value.reason == (
        "truncated JSON at line 3, column 22 (file ends inside a string that starts at line 3, column 13)"
    )


def test_invalid_json_array(tmp_path):
    path = write(tmp_path, "x.json", '[\n {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(SeedFileError) as e:
        read_seed(path)
    assert e.value.reason == "invalid JSON at line 2, column 22: Expecting ',' delimiter"


def test_invalid_utf8_in_array(tmp_path):
    content = b'[\n {"instruction": "a",\n  "output": "caf\xff!"}\n]'
    path = write(tmp_path, "x.json", content)
    with pytest.raises(SeedFileError) as e:
        read_seed(path)
    assert e.value.reason == "invalid UTF-8: byte 0xff at line 3, column 17"


def test_utf16_file(tmp_path):
    path = write(tmp_path, "x.json", json.dumps(ALPACA).encode("utf-16"))
    with pytest.raises(SeedFileError, match=r"invalid UTF-8: byte 0x(ff|fe) at line 1, column 1 .*UTF-16"):
        read_seed(path)


def test_top_level_object(tmp_path):
    path = write(tmp_path, "x.json", json.dumps({"data": ALPACA}, indent=2))
    with pytest.raises(SeedFileError) as e:
        read_seed(path)
    assert e.value.reason.startswith("expected a JSON array of objects, found a top-level object")
    assert "'data' holds an array of 3 objects" in e.value.reason


@pytest.mark.parametrize("content, found", [('"hello"', "string"), ("42", "number"), ("null", "null")])
def test_top_level_scalar(tmp_path, content, found):
    path = write(tmp_path, "x.json", content)
    with pytest.raises(SeedFileError) as e:
        read_seed(path)
    assert e.value.reason == f"expected a JSON array of objects, found a top-level {found}"


def test_array_of_non_objects(tmp_path):
    with pytest.raises(SeedFileError) as e:
        read_seed(write(tmp_path, "x.json", "[1, 2, 3]"))
    assert e.value.reason == "expected a JSON array of objects, found an array whose record 1 is a number"


def test_not_json_at_all(tmp_path):
    path = write(tmp_path, "x.csv", "instruction,output\nhello,world\n")
    with pytest.raises(SeedFileError) as e:
        read_seed(path)
    assert e.value.reason.startswith("unknown format: not a JSON array, JSON Lines of objects or Parquet")
    assert "line 1: invalid JSON: Expecting value at column 1" in e.value.reason


def test_corrupt_parquet(tmp_path):
    path = write(tmp_path, "x.parquet", b"PAR1" + b"\x00" * 64 + b"PAR1")
    with pytest.raises(SeedFileError, match=r"x.parquet: unreadable Parquet file: "):
        read_seed(path)


def test_parquet_without_known_columns(tmp_path):
    path = tmp_path / "x.parquet"
    pl.DataFrame({"q": ["a"], "a": ["b"]}).write_parquet(path)
    with pytest.raises(SeedFileError, match="cannot tell the format"):
        read_seed(path)


def test_deeply_nested_array(tmp_path):
    path = write(tmp_path, "x.json", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(SeedFileError, match="nested too deeply"):
        read_seed(path)


def test_max_chars_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        read_seed(write(tmp_path, "s.json", json.dumps(ALPACA)), max_chars=0)


# ----------------------------------------------------------------------------- bad records

GOOD = {"instruction": "Say hi.", "output": "Hi."}


@pytest.mark.parametrize(
    "line, field, reason",
    [
        ('{"instruction": "a", "output": }', "(record)", "invalid JSON: Expecting value at column 32"),
        ('{"instruction": "a"', "(record)", "invalid JSON: Expecting ',' delimiter at column 20"),
        ('["a", "b"]', "(record)", "not an object: found an array"),
        ('"just text"', "(record)", "not an object: found a string"),
        ('{"output": "b"}', "instruction", "missing field"),
        ('{"instruction": "a"}', "output", "missing field"),
        ('{"instruction": "a", "output": 42}', "output", "wrong type: expected a string, found a number"),
        ('{"instruction": "a", "output": ["b"]}', "output", "wrong type: expected a string, found an array"),
        ('{"instruction": null, "output": "b"}', "instruction", "wrong type: expected a string, found null"),
        ('{"instruction": true, "output": "b"}', "instruction", "wrong type: expected a string, found a boolean"),
        ('{"instruction": "a", "input": 3, "output": "b"}', "input", "wrong type: expected a string, found a number"),
        ('{"instruction": "a", "input": {}, "output": "b"}', "input", "wrong type: expected a string, found an object"),
        ('{"instruction": "  \\n\\t ", "output": "b"}', "instruction", "blank: empty after stripping whitespace"),
        ('{"instruction": "a", "output": ""}', "output", "blank: empty after stripping whitespace"),
        (
            '{"instruction": "a\\ud800b", "output": "b"}',
            "instruction",
            "invalid text: lone surrogate U+D800 at character 2",
        ),
        # an int too long for Python's int(): a number like any other (issue 14.10)
        (
            '{"instruction": "a", "output": 1' + "0" * 5000 + "}",
            "output",
            "wrong type: expected a string, found a number",
        ),
    ],
)
def test_bad_jsonl_record(tmp_path, line, field, reason):
    path = write(tmp_path, "s.jsonl", jsonl(GOOD, "", line, {"instruction": "Other.", "output": "Yes."}))
    result = read_seed(path)
    assert result.format == "alpaca_jsonl"
    assert result.usable == 2 and result.total_records == 3
    row = only_rejection(result)
    assert row["source_file"] == str(path)
    assert row["location"] == "line 3"  # physical line: the blank line 2 counts
    assert row["field"] == field
    if reason is None:
        assert row["reason"].startswith("invalid JSON: Exceeds the limit")
    else:
        assert row["reason"] == reason
    assert row["raw"] == line[:300] + ("…" if len(line) > 300 else "")


def test_invalid_utf8_line_others_usable(tmp_path):
    content = (jsonl(GOOD) + '{"instruction": "caf').encode() + b"\xe9" + b'", "output": "b"}\n'
    content += jsonl({"instruction": "x", "output": "y"}).encode()
    result = read_seed(write(tmp_path, "s.jsonl", content))
    assert result.usable == 2
    row = only_rejection(result)
    assert (row["location"], row["field"], row["reason"]) == (
        "line 2",
        "(record)",
        "invalid UTF-8: byte 0xe9 at column 21",
    )
    assert "\\xe9" in row["raw"]


def test_bad_record_in_array_has_record_and_line(tmp_path):
    rows = [GOOD, {"instruction": "a", "output": 3}, {"instruction": "b", "output": "c"}]
    path = write(tmp_path, "s.json", json.dumps(rows, indent=2))
    result = read_seed(path)
    row = only_rejection(result)
    # indent=2: "[", then 4 lines per record
    assert row["location"] == "record 2 (line 6)"
    assert row["field"] == "output"
    assert row["reason"] == "wrong type: expected a string, found a number"
    assert json.loads(row["raw"]) == rows[1]


def test_not_an_object_in_array(tmp_path):
    result = read_seed(write(tmp_path, "s.json", json.dumps([GOOD, "oops", None])))
    assert result.quarantine["location"].to_list() == ["record 2 (line 1)", "record 3 (line 1)"]
    assert result.quarantine["reason"].to_list() == ["not an object: found a string", "not an object: found null"]


def test_duplicates(tmp_path):
    dup_ws = {"instruction": " Say hi.\n", "output": "Hi.  ", "category": "other"}  # same after normalizing
    path = write(tmp_path, "s.jsonl", jsonl(GOOD, ALPACA[0], GOOD, dup_ws))
    result = read_seed(path)
    assert result.usable == 2
    assert result.quarantine["location"].to_list() == ["line 3", "line 4"]
    assert result.quarantine["field"].to_list() == ["(record)", "(record)"]
    assert result.quarantine["reason"].to_list() == ["duplicate: same content as line 1"] * 2
    assert result.rejected_by_reason() == {"duplicate": 2}
    assert result.samples["sample_id"].n_unique() == 2


def test_duplicate_in_array_names_first_record(tmp_path):
    result = read_seed(write(tmp_path, "s.json", json.dumps([GOOD, ALPACA[0], GOOD])))
    assert only_rejection(result)["reason"] == "duplicate: same content as record 1 (line 1)"


def test_overlong(tmp_path):
    long = {"instruction": "a" * 60, "input": "b" * 30, "output": "c" * 11}
    path = write(tmp_path, "s.jsonl", jsonl(GOOD, long))
    row = only_rejection(read_seed(path, max_chars=100))
    assert (row["location"], row["field"], row["reason"]) == (
        "line 2",
        "(record)",
        "too long: 101 characters (limit 100)",
    )
    assert row["raw"] == json.dumps(long)
    assert read_seed(path, max_chars=101).rejected == 0


@pytest.mark.parametrize(
    "conversation, field, reason",
    [
        (
            [{"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Hi"}],
            "conversations[0].from",
            "no human turn first: first turn is 'gpt'",
        ),
        (
            [{"from": "system", "value": "s"}, {"from": "gpt", "value": "Hello"}],
            "conversations[1].from",
            "no human turn first: first turn is 'gpt'",
        ),
        ([{"from": "system", "value": "s"}], "conversations", "no human turn first: only system turns"),
        (
            [{"from": "human", "value": "Hi"}],
            "conversations",
            "no gpt reply: the conversation ends after the human turn",
        ),
        (
            [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hello?"}],
            "conversations[1].from",
            "no gpt reply: the human turn is followed by 'human', not gpt",
        ),
        ([], "conversations", "empty conversation: no turns"),
        ("Hi", "conversations", "wrong type: expected an array, found a string"),
        (["Hi", "Hello"], "conversations[0]", "wrong type: expected an object, found a string"),
        ([{"value": "Hi"}, {"from": "gpt", "value": "Hello"}], "conversations[0].from", "missing field"),
        ([{"from": "human"}, {"from": "gpt", "value": "Hello"}], "conversations[0].value", "missing field"),
        (
            [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": 5}],
            "conversations[1].value",
            "wrong type: expected a string, found a number",
        ),
        (
            [{"from": "human", "value": " "}, {"from": "gpt", "value": "Hello"}],
            "conversations[0].value",
            "blank: empty after stripping whitespace",
        ),
    ],
)
def test_bad_sharegpt_record(tmp_path, conversation, field, reason):
    path = write(tmp_path, "c.jsonl", jsonl(SHAREGPT[1], {"conversations": conversation}))
    result = read_seed(path)
    assert result.format == "sharegpt"
    row = only_rejection(result)
    assert (row["location"], row["field"], row["reason"]) == ("line 2", field, reason)


def test_sharegpt_missing_conversations_and_case_insensitive_roles(tmp_path):
    ok = {"conversations": [{"from": "Human", "value": "Hi"}, {"from": "GPT", "value": "Yo"}]}
    result = read_seed(write(tmp_path, "c.json", json.dumps([ok, {"id": 3}], indent=None)))
    assert result.samples["output"].to_list() == ["Yo"]
    row = only_rejection(result)
    assert (row["location"], row["field"], row["reason"]) == ("record 2 (line 1)", "conversations", "missing field")


def test_later_malformed_turns_are_only_truncated(tmp_path):
    conv = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}, 42]}
    result = read_seed(write(tmp_path, "c.jsonl", jsonl(conv)))
    assert result.usable == 1 and result.rejected == 0 and result.truncated_conversations == 1


@pytest.mark.parametrize(
    "messages, field, reason",
    [
        (
            [{"role": "assistant", "content": "Hello"}],
            "messages[0].role",
            "no user turn first: first turn is 'assistant'",
        ),
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": "Hi"}],
            "messages",
            "no assistant reply: the conversation ends after the user turn",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "{}"}],
            "messages[1].role",
            "no assistant reply: the user turn is followed by 'tool', not assistant",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Yo"}],
            "messages[0].content",
            "wrong type: expected a string, found an array",
        ),
        ([{"role": "developer", "content": "d"}], "messages", "no user turn first: only developer/system turns"),
    ],
)
def test_bad_messages_record(tmp_path, messages, field, reason):
    path = write(tmp_path, "m.json", json.dumps([MESSAGES[0], {"messages": messages}]))
    result = read_seed(path)
    assert result.format == "messages"
    row = only_rejection(result)
    assert (row["location"], row["field"], row["reason"]) == ("record 2 (line 1)", field, reason)


def test_mixed_file_conservation_and_counts(tmp_path):
    lines = [
        json.dumps(GOOD),
        "{oops",
        json.dumps({"instruction": "a", "output": 1}),
        json.dumps({"instruction": "b", "output": 2}),
        json.dumps(GOOD),
        "",
        json.dumps({"instruction": "c", "output": "d", "extra": [1, 2]}),
    ]
    result = read_seed(write(tmp_path, "s.jsonl", "\n".join(lines)))
    assert result.total_records == 6
    assert result.usable == 2 and result.rejected == 4
    assert result.rejected_by_reason() == {"wrong type": 2, "duplicate": 1, "invalid JSON": 1}
    assert list(result.rejected_by_reason()) == ["wrong type", "duplicate", "invalid JSON"]
    assert result.rejection_lines()[0] == (
        f"{tmp_path / 's.jsonl'}:line 2: (record): invalid JSON: "
        "Expecting property name enclosed in double quotes at column 2"
    )
    summary = result.summary()
    assert summary["usable"] == 2 and summary["rejected_by_reason"]["wrong type"] == 2
    assert_conserved(result)


def test_reason_kind():
    assert reason_kind("wrong type: expected a string, found a number") == "wrong type"
    assert reason_kind("missing field") == "missing field"


# ----------------------------------------------------------------------------- properties

KEYS = st.sampled_from(
    ["instruction", "input", "output", "conversations", "messages", "from", "value", "role", "content", "x"]
)
JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS | st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)
RECORD = st.dictionaries(KEYS, JSON_VALUES, max_size=5)
TURN = st.fixed_dictionaries(
    {"from": st.sampled_from(["human", "gpt", "system", "user", "assistant", "bot"]), "value": JSON_LEAVES}
)
SHAREGPT_RECORD = st.fixed_dictionaries({"conversations": st.lists(TURN, max_size=4)})
ANY_RECORD = RECORD | SHAREGPT_RECORD | JSON_VALUES

PROPERTY_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def check_accounted(path: Path, **kwargs) -> None:
    try:
        result = read_seed(path, **kwargs)
    except SeedFileError as e:
        assert str(e).startswith(f"{path}: ")
        return
    assert_conserved(result)
    assert result.total_records > 0
    assert sum(result.rejected_by_reason().values()) == result.rejected
    assert result.samples["sample_id"].n_unique() == result.usable


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=400))
def test_property_arbitrary_bytes(tmp_path, data):
    path = write(tmp_path, "any.bin", data)
    check_accounted(path)


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=200), fmt=st.sampled_from(FORMATS))
def test_property_arbitrary_bytes_with_format(tmp_path, data, fmt):
    path = write(tmp_path, "any.bin", data)
    check_accounted(path, format=fmt)


@PROPERTY_SETTINGS
@given(records=st.lists(ANY_RECORD, max_size=8), as_lines=st.booleans(), fmt=st.sampled_from([None, *FORMATS[:4]]))
def test_property_arbitrary_json(tmp_path, records, as_lines, fmt):
    text = jsonl(*[json.dumps(r) for r in records]) if as_lines else json.dumps(records, indent=1)
    path = write(tmp_path, "any.json", text)
    check_accounted(path, format=fmt)
    try:
        result = read_seed(path, format=fmt)
    except SeedFileError:
        return
    one_array_line = as_lines and len(records) == 1 and isinstance(records[0], list)  # a JSON array
    container_forced = fmt == ("alpaca_json" if as_lines else "alpaca_jsonl")
    if not (one_array_line or container_forced):
        assert result.total_records == len(records)


@PROPERTY_SETTINGS
@given(records=st.lists(st.fixed_dictionaries({"instruction": st.text(), "output": st.text()}), max_size=8))
def test_property_alpaca_text_round_trips(tmp_path, records):
    path = write(tmp_path, "s.json", json.dumps(records))
    try:
        result = read_seed(path)
    except SeedFileError:
        assert not records
        return
    assert_conserved(result)
    assert result.total_records == len(records)
    kinds = set(result.rejected_by_reason())
    assert kinds <= {"blank", "duplicate", "invalid text"}
