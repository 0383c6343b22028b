"""benchmarks/README.md's results table is the one ``benchmarks/results_table.py`` makes from
``benchmarks/results/*.json`` (regenerate: ``python -m benchmarks.results_table --write``)."""

import json

from benchmarks import results_table


def test_readme_table_is_current():
    assert results_table.main(["--check"]) == 0


def test_check_fails_on_a_stale_table(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "quick.json").write_text(json.dumps({"signal_speedup_vs_reference": 1.5}))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results_table.START}\n{results_table.table(results)}{results_table.END}\nend\n")
    args = ["--check", "--results", str(results), "--readme", str(readme)]
    assert results_table.main(args) == 0
    (results / "quick.json").write_text(json.dumps({"signal_speedup_vs_reference": 2.5}))
    assert results_table.main(args) == 1
    assert results_table.main(["--write", "--results", str(results), "--readme", str(readme)]) == 0
    assert results_table.main(args) == 0
    assert "| 2.5 |" in readme.read_text()
