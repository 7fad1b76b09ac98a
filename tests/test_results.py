"""Atomic run records and the aggregated MAUVE / perplexity tables."""

import json

import pytest

from experiments.pipeline.records import git_commit, load_runs, new_run_id, package_versions, write_run
from experiments.tables import build_table, main as tables_main, write_tables


def fake_metrics(objective, corpus, mauve, run_id, model="gpt2", ppl=30.0):
    return {"run_id": run_id, "objective": objective, "corpus": corpus, "model": model, "test_perplexity": ppl,
            "mauve": {"mean": mauve, "std": 0.01, "values": [mauve - 0.01, mauve + 0.01]}}


def test_write_run_is_atomic_and_complete(tmp_path):
    run_dir = write_run(tmp_path, "exp", "r1", metrics={"a": 1}, manifest={"b": 2}, jsonl={"generations.jsonl": [{"x": 1}, {"x": 2}]})
    assert sorted(p.name for p in run_dir.iterdir()) == ["generations.jsonl", "manifest.json", "metrics.json"]
    assert json.loads((run_dir / "metrics.json").read_text()) == {"a": 1}
    assert [json.loads(l) for l in (run_dir / "generations.jsonl").read_text().splitlines()] == [{"x": 1}, {"x": 2}]
    with pytest.raises(FileExistsError):
        write_run(tmp_path, "exp", "r1", metrics={}, manifest={}, jsonl={"generations.jsonl": []})

    def failing():
        yield {"x": 1}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_run(tmp_path, "exp", "r2", metrics={}, manifest={}, jsonl={"generations.jsonl": failing()})
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["r1"]


def test_load_runs_skips_incomplete(tmp_path):
    write_run(tmp_path, "exp", "r1", metrics={"run_id": "r1"}, manifest={}, jsonl={"generations.jsonl": []})
    (tmp_path / "exp" / ".r2.tmp").mkdir()
    (tmp_path / "exp" / "r3").mkdir()
    assert [r["run_id"] for r in load_runs(tmp_path)] == ["r1"]
    assert load_runs(tmp_path, "missing") == []


def test_table_rows_columns_bold_and_latest(tmp_path):
    runs = [fake_metrics("mle", "ptb", 0.80, "2024_a"), fake_metrics("emo", "ptb", 0.90, "2024_b", ppl=40.0),
            fake_metrics("emo", "wikitext2", 0.70, "2024_c"), fake_metrics("mle", "wikitext2", 0.60, "2024_d"),
            fake_metrics("mle", "wikitext2", 0.75, "2025_e")]
    values, cells = build_table(runs, "lm_mauve")
    assert list(cells.index) == ["mle", "emo"] and list(cells.columns) == ["wikitext2", "ptb"]
    assert cells.loc["mle", "wikitext2"] == "**0.750 ± 0.010**" and cells.loc["emo", "ptb"] == "**0.900 ± 0.010**"
    assert cells.loc["mle", "ptb"] == "0.800 ± 0.010" and values.loc["mle", "wikitext2 mean"] == 0.75
    _, ppl = build_table(runs, "lm_perplexity")
    assert ppl.loc["mle", "ptb"] == "**30.00**"
    _, multi = build_table(runs + [fake_metrics("emo", "ptb", 0.5, "2026_f", model="opt-125m")], "lm_mauve")
    assert "opt-125m / emo" in multi.index and "gpt2 / mle" in multi.index


def test_tables_cli_writes_md_csv_tex(tmp_path, capsys):
    for i, (obj, corpus) in enumerate([("mle", "ptb"), ("emo", "ptb")]):
        write_run(tmp_path, "lm_gpt2", f"r{i}", metrics=fake_metrics(obj, corpus, 0.5 + i / 10, f"r{i}"),
                  manifest={}, jsonl={"generations.jsonl": []})
    assert tables_main(["--results-dir", str(tmp_path)]) == 0
    out = tmp_path / "tables"
    assert {p.name for p in out.iterdir()} >= {f"lm_mauve.{s}" for s in ("md", "csv", "tex")}
    assert "**0.600 ± 0.010**" in (out / "lm_mauve.md").read_text()
    assert r"\textbf{0.600 $\pm$ 0.010}" in (out / "lm_mauve.tex").read_text()
    assert (out / "lm_mauve.csv").read_text().splitlines()[0] == "objective,ptb mean,ptb std"
    assert "lm_mauve" in capsys.readouterr().out
    assert write_tables(tmp_path, "other") == {}
    assert tables_main(["--results-dir", str(tmp_path), "--experiment", "other"]) == 1


def test_manifest_helpers():
    assert len(new_run_id("ptb", "emo").split("_")) == 4
    assert isinstance(git_commit(), str) and git_commit("/") == "unknown"
    assert package_versions(["torch", "surely-not-installed-pkg"])["surely-not-installed-pkg"] is None
