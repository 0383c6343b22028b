"""``python -m benchmarks --merge``: a results file keeps the latest run of every section, says
when and how each was measured, and recomputes the headline and goals from all of them."""

import json

import pytest

from benchmarks.__main__ import main


def test_merge_keeps_other_sections_and_imports_with_their_runs(tmp_path, capsys):
    out = tmp_path / "quick.json"
    out.write_text(
        json.dumps(
            {
                "environment": {"torch": "old"},
                "sections": {"ray": {"ray_overhead_at_equal_cores": 0.5}, "knn": {"sizes": {}}},
            }
        )
    )
    gen = tmp_path / "generation.json"  # a results file of another run
    gen.write_text(
        json.dumps(
            {
                "sections": {"generation": {"speedup_vs_transformers_generate": 4.27, "default_path": "compact"}},
                "section_runs": {"generation": {"date": "2026-12-01 05:00", "command": "x"}},
            }
        )
    )
    det = tmp_path / "detection.json"  # one section's own JSON
    det.write_text(json.dumps({"date": "2026-11-30", "command": "y", "detection_auroc": {"complexity": 0.95}}))
    ray = tmp_path / "ray.json"
    ray.write_text(
        json.dumps({"sections": {"ray": {"ray_overhead_at_equal_cores": 0.1}}, "section_seconds": {"ray": 9}})
    )

    assert (
        main(
            [
                "--quick",
                "--merge",
                "--import",
                f"generation={gen}",
                "--import",
                f"detection={det}",
                "--import",
                f"ray={ray}",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert list(res["sections"]) == ["knn", "detection", "generation", "ray"]  # the sections' own order
    assert res["generation_speedup_vs_transformers_generate"] == 4.27
    assert res["goals"]["generation_speedup_vs_transformers_generate"]["met"] is False
    assert res["detection_auroc"]["complexity"] == 0.95 and res["goals"]["detection_auroc.complexity"]["met"]
    assert res["ray_overhead_at_equal_cores"] == 0.1  # the import replaced the old figure
    runs = res["section_runs"]
    assert runs["knn"]["date"].startswith("unknown") and runs["knn"]["environment"] == {"torch": "old"}
    assert runs["generation"]["date"] == "2026-12-01 05:00" and runs["generation"]["imported_from"] == str(gen)
    assert runs["detection"]["command"] == "y" and runs["ray"]["seconds"] == 9
    assert f"results in {out}" in capsys.readouterr().out

    with pytest.raises(SystemExit):  # an unknown section or a file without it is an error, not a silent skip
        main(["--quick", "--merge", "--import", f"nosuch={gen}", "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["--quick", "--merge", "--import", f"speed={gen}", "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["--quick", "--import", f"generation={gen}", "--out", str(out)])


def test_speed_and_generation_bring_their_hardware_bound():
    """MFU and "% of bound" divide by the matmul peak measured in the same run: ``--only speed``
    (or generation) must measure the hardware too, not reuse a merged file's older peak."""
    from benchmarks.__main__ import with_dependencies

    assert with_dependencies(["speed", "knn"]) == ["hardware", "speed", "knn"]
    assert with_dependencies(["generation"]) == ["hardware", "generation"]
    assert with_dependencies(["hardware", "speed"]) == ["hardware", "speed"]
    assert with_dependencies(["knn", "judge"]) == ["knn", "judge"]


def test_only_into_the_default_file_merges(tmp_path, monkeypatch):
    """``--only X`` without ``--out`` writes the default results file: it must keep the other
    sections (a user running one section once replaced the whole file with it)."""
    import benchmarks.__main__ as bench_main
    from benchmarks import hardware

    (tmp_path / "quick.json").write_text(json.dumps({"sections": {"ray": {"ray_overhead_at_equal_cores": 0.5}}}))
    monkeypatch.setattr(bench_main, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(hardware, "run", lambda settings, models: {"fp32": {"gflops": 1.0}})
    assert main(["--quick", "--only", "hardware"]) == 0
    res = json.loads((tmp_path / "quick.json").read_text())
    assert set(res["sections"]) == {"ray", "hardware"}
    assert res["ray_overhead_at_equal_cores"] == 0.5

    elsewhere = tmp_path / "one.json"  # an explicit --out still gets only what ran
    assert main(["--quick", "--only", "hardware", "--out", str(elsewhere)]) == 0
    assert set(json.loads(elsewhere.read_text())["sections"]) == {"hardware"}


def test_a_skipped_section_keeps_its_last_measurement(tmp_path):
    """A plain ``--quick --merge`` skips downstream and gate (whole rounds): that must not wipe
    the figures an earlier ``--only downstream`` / ``--only gate`` run measured."""
    from benchmarks.__main__ import merge_results

    path = tmp_path / "quick.json"
    measured = {"flag": {"by_kind": {}}}
    path.write_text(
        json.dumps(
            {
                "sections": {"gate": measured, "downstream": {"skipped": True, "reason": "old"}},
                "section_runs": {"gate": {"date": "2026-12-04 11:38"}},
            }
        )
    )
    skipped = {"skipped": True, "reason": "--quick"}
    sections, runs = merge_results(
        path,
        {"gate": skipped, "downstream": skipped, "knn": {"sizes": {}}},
        {"gate": {"date": "now"}, "downstream": {"date": "now"}, "knn": {"date": "now"}},
        [],
        pytest.fail,
    )
    assert sections["gate"] == measured and runs["gate"]["date"] == "2026-12-04 11:38"
    assert sections["downstream"] == skipped and runs["downstream"]["date"] == "now"  # nothing measured to keep
    assert sections["knn"] == {"sizes": {}}
    fresh = {"flag": {"by_kind": {"good": {}}}}
    sections, runs = merge_results(path, {"gate": fresh}, {"gate": {"date": "now"}}, [], pytest.fail)
    assert sections["gate"] == fresh and runs["gate"]["date"] == "now"  # a new measurement replaces it
