"""Atomic run records, run setups, and the aggregated tables (identity, seed pooling, the builder registry)."""

import json

import pandas as pd
import pytest

from experiments.pipeline.records import (build_manifest, flatten, git_commit, load_runs, new_run_id,
                                          package_versions, require_new_run, run_setup, write_run)
from experiments.pipeline.lm_table import lm_tables
from experiments.pipeline.run_groups import group_runs
from experiments.pipeline.table_format import Table, bold_best, empty_sources, latex, pivot_table, write_table
from experiments.tables import TABLE_BUILDERS, main as tables_main, write_tables


def fake_metrics(objective, corpus, mauve, run_id, model="gpt2", ppl=30.0, **fields):
    return {"run_id": run_id, "objective": objective, "corpus": corpus, "model": model, "test_perplexity": ppl,
            "mauve": {"mean": mauve, "std": 0.01, "values": [mauve - 0.01, mauve + 0.01]},
            "diversity": {"rep_2": {"mean": 0.1, "std": 0.0, "values": [0.1, 0.1]}}, "gold_diversity": {"rep_2": 0.1},
            **fields}


def build_table(runs, name, model="gpt2"):
    return lm_tables(runs)[f"{name}_{model}"][:2]


def test_write_run_is_atomic_and_complete(tmp_path):
    run_dir = write_run(tmp_path, "exp", "r1", metrics={"a": 1}, manifest={"b": 2},
                        jsonl={"generations.jsonl": [{"x": 1}, {"x": 2}]})
    assert sorted(p.name for p in run_dir.iterdir()) == ["generations.jsonl", "manifest.json", "metrics.json"]
    assert json.loads((run_dir / "metrics.json").read_text()) == {"a": 1}
    assert [json.loads(l) for l in (run_dir / "generations.jsonl").read_text().splitlines()] == [{"x": 1}, {"x": 2}]
    with pytest.raises(FileExistsError):
        write_run(tmp_path, "exp", "r1", metrics={}, manifest={}, jsonl={"generations.jsonl": []})
    with pytest.raises(FileExistsError, match="'r1' of experiment 'exp' is already complete"):
        require_new_run(tmp_path, "exp", "r1")
    require_new_run(tmp_path, "exp", "r2")

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
    assert ppl.loc["mle", "ptb PPL ↓"] == "**30.00**"
    tables = lm_tables(runs + [fake_metrics("emo", "ptb", 0.5, "2026_f", model="opt-125m")])  # one pair per model
    assert list(tables["lm_mauve_gpt2"][1].index) == ["mle", "emo"]
    assert dict(tables["lm_mauve_opt-125m"][1]["ptb"]) == {"emo": "**0.500 ± 0.010**"}


def test_tables_cli_writes_md_csv_tex(tmp_path, capsys):
    for i, (obj, corpus) in enumerate([("mle", "ptb"), ("emo", "ptb")]):
        write_run(tmp_path, "lm_gpt2", f"r{i}", metrics=fake_metrics(obj, corpus, 0.5 + i / 10, f"r{i}"),
                  manifest={}, jsonl={"generations.jsonl": []})
    assert tables_main(["--results-dir", str(tmp_path)]) == 0
    out = tmp_path / "tables"
    assert (out / "lm_mauve_gpt2.md").read_text() == (  # the format of a table of single runs
        "MAUVE ↑ of gpt2 fine-tuned with each objective (mean ± std over sampling seeds); 2 runs of experiment "
        "lm_gpt2; best per corpus in bold.\n\n"
        "| objective   | ptb               |\n"
        "|:------------|:------------------|\n"
        "| mle         | 0.500 ± 0.010     |\n"
        "| emo         | **0.600 ± 0.010** |\n")
    assert {p.name for p in out.iterdir()} >= {f"lm_mauve_gpt2.{s}" for s in ("md", "csv", "tex")}
    assert r"\textbf{0.600 $\pm$ 0.010}" in (out / "lm_mauve_gpt2.tex").read_text()
    assert (out / "lm_mauve_gpt2.csv").read_text().splitlines()[0] == "objective,ptb mean,ptb std"
    assert "lm_mauve_gpt2" in capsys.readouterr().out
    assert not any(write_tables(tmp_path, "other").values())
    assert tables_main(["--results-dir", str(tmp_path), "--experiment", "other"]) == 1


def test_manifest_helpers():
    assert len(new_run_id("ptb", "emo").split("_")) == 4
    assert isinstance(git_commit(), str) and git_commit("/") == "unknown"
    assert package_versions(["torch", "surely-not-installed-pkg"])["surely-not-installed-pkg"] is None


def test_runs_differing_only_in_decoding_get_their_own_rows():
    runs = [fake_metrics("emo", "ptb", 0.90, "r1", decoding="unbiased"),
            fake_metrics("emo", "ptb", 0.80, "r2", decoding="top_p"),
            fake_metrics("mle", "ptb", 0.70, "r3", decoding="unbiased")]
    values, cells = build_table(runs, "lm_mauve")
    assert list(cells.index) == ["mle (decoding=unbiased)", "emo (decoding=top_p)", "emo (decoding=unbiased)"]
    assert cells.loc["emo (decoding=top_p)", "ptb"] == "0.800 ± 0.010"
    assert cells.loc["emo (decoding=unbiased)", "ptb"] == "**0.900 ± 0.010**"
    assert list(values.columns) == ["ptb mean", "ptb std"]


def test_runs_differing_only_in_seed_are_pooled_and_reruns_replaced():
    seeds = lambda training, sampling: {"training": training, "sampling": sampling}  # noqa: E731
    runs = [fake_metrics("emo", "ptb", 0.0, "2024_a", seeds=seeds(1, [0, 1])),
            fake_metrics("emo", "ptb", 0.0, "2024_b", seeds=seeds(2, [0, 1])),
            fake_metrics("emo", "ptb", 0.0, "2024_c", seeds=seeds(1, [0, 1])),  # a rerun of 2024_a: replaces it
            fake_metrics("mle", "ptb", 0.5, "2024_d", seeds=seeds(1, [0, 1]))]
    runs[1]["mauve"]["values"], runs[2]["mauve"]["values"] = [0.5, 0.6], [0.7, 0.8]
    values, cells = build_table(runs, "lm_mauve")
    assert list(cells.index) == ["mle", "emo"]
    mean, std = pd.Series([0.5, 0.6, 0.7, 0.8]).mean(), pd.Series([0.5, 0.6, 0.7, 0.8]).std()
    assert values.loc["emo", "ptb mean"] == pytest.approx(mean) and values.loc["emo", "ptb std"] == pytest.approx(std)
    assert values.loc["emo", "ptb runs"] == 2 and values.loc["mle", "ptb runs"] == 1
    assert cells.loc["emo", "ptb"] == f"**{mean:.3f} ± {std:.3f} (n=2)**"
    _, ppl = build_table(runs, "lm_perplexity")
    assert ppl.loc["emo", "ptb PPL ↓"] == "**30.00 ± 0.00 (n=2)**"  # ties are all best


def test_objective_hyper_parameters_split_only_their_own_objective():
    runs = [fake_metrics("emo", "ptb", 0.9, "r1", objective_hparams={"gt_q": False}),
            fake_metrics("emo", "ptb", 0.8, "r2", objective_hparams={"gt_q": True}),
            fake_metrics("mle", "ptb", 0.7, "r3", objective_hparams={})]
    _, cells = build_table(runs, "lm_mauve")
    assert list(cells.index) == ["mle", "emo (objective_hparams.gt_q=false)", "emo (objective_hparams.gt_q=true)"]


def test_cells_that_would_be_ambiguous_are_an_error():
    runs = [fake_metrics("emo", "ptb", 0.9, "r1", num_prompts=8), fake_metrics("emo", "ptb", 0.8, "r2",
                                                                                  num_prompts="8")]
    with pytest.raises(ValueError, match=r"different setups share the table cell \(emo \(num_prompts=8\), ptb\)"):
        group_runs(runs)


def test_run_setup_ignores_seeds_paths_and_bookkeeping(compose_cfg):
    base = ("experiment=lm_tiny", "paths.output_dir=/tmp/a")
    setup = run_setup(compose_cfg(*base))
    assert setup == run_setup(compose_cfg("experiment=lm_tiny", "paths.output_dir=/tmp/b", "seed=7",
                                          "paths.data_dir=/elsewhere", "generation.base_seed=3", "tracker=wandb",
                                          "trainer.logging_steps=9", "run_id=x"))
    assert setup["model.tokenizer"] == "<paths.data_dir>/gpt2_tokenizer" and "seed" not in setup
    assert setup["decoding.name"] == "unbiased" and setup["trainer.max_steps"] == 2
    assert not [k for k in setup if k.startswith(("paths.", "tracker.", "generation.base_seed"))]
    assert run_setup(compose_cfg(*base, "decoding=top_p")) != setup
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": 1, "a.c": {}, "d": [1]}


def test_tables_from_manifests_split_setups_and_pool_seeds(tmp_path, compose_cfg):
    def record(run_id, *overrides, mauve):
        cfg = compose_cfg("experiment=lm_tiny", "objective=emo", f"paths.output_dir={tmp_path / run_id}", *overrides)
        manifest = build_manifest(cfg, run_id=run_id, seeds={"training": cfg.seed}, data_fingerprint={},
                                  output_dir=tmp_path / run_id)
        metrics = fake_metrics("emo", "wikitext2_local", mauve, run_id)
        write_run(tmp_path / "results", "lm_tiny", run_id, metrics=metrics, manifest=manifest)

    record("r1", mauve=0.5)
    record("r2", "seed=1", mauve=0.7)
    record("r3", "decoding=top_p", mauve=0.9)
    record("r4", "objective.hparams.gt_q=true", mauve=0.1)
    runs = load_runs(tmp_path / "results", "lm_tiny")
    assert all("setup" in r and "seeds" in r for r in runs)
    _, cells = build_table(runs, "lm_mauve")
    assert dict(cells["wikitext2_local"]) == {
        "emo (decoding=top_p, objective.hparams.gt_q=false)": "**0.900 ± 0.010**",
        "emo (decoding=unbiased, objective.hparams.gt_q=false)": "0.600 ± 0.116 (n=2)",  # 0.49, 0.51, 0.69, 0.71
        "emo (decoding=unbiased, objective.hparams.gt_q=true)": "0.100 ± 0.010"}


def test_registered_builders_write_md_csv_tex(tmp_path, monkeypatch):
    def accuracy_tables(runs):
        runs = [r for r in runs if "accuracy" in r]
        table = pivot_table(runs, read=lambda r: r["accuracy"], higher_better=True, decimals=1, column="task")
        return {"fewshot_accuracy": table}

    monkeypatch.setitem(TABLE_BUILDERS, "fewshot", accuracy_tables)
    for i, (objective, task, accuracy) in enumerate([("mle", "sst2", 80.0), ("emo", "sst2", 85.0)]):
        write_run(tmp_path, "fewshot", f"r{i}", manifest={},
                  metrics={"run_id": f"r{i}", "objective": objective, "task": task, "accuracy": accuracy})
    written = write_tables(tmp_path, "fewshot")
    assert {kind: set(tables) for kind, tables in written.items() if tables} == {"fewshot": {"fewshot_accuracy"}}
    assert "| emo         | **85.0** |" in written["fewshot"]["fewshot_accuracy"].read_text()
    assert (tmp_path / "tables" / "fewshot_accuracy.csv").read_text().splitlines()[1] == "mle,80.0,"


def test_write_table_and_bold_best(tmp_path):
    cells = pd.DataFrame({"a": ["1.0", "2.0"]}, index=pd.Index(["x_1", "y"], name="objective"))
    bold_best(cells, "a", pd.Series([1.0, 2.0], index=["x_1", "y"]), higher_better=False)
    assert list(cells["a"]) == ["**1.0**", "2.0"]
    sources = empty_sources(cells)
    sources.at["x_1", "a"], sources.at["y", "a"] = ("exp/r1",), ("exp/r2",)
    table = Table(pd.DataFrame({"a mean": [1.0, 2.0]}, index=cells.index), cells, "Cap", sources)
    path = write_table(tmp_path, "t", table)
    assert path.read_text().startswith("Cap; 2 runs of experiment exp; best per column in bold.\n\n| objective   |")
    assert r"x\_1 & \textbf{1.0} \\" in latex(cells, "Cap")
    assert r"\caption{Cap; 2 runs" in (tmp_path / "t.tex").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "sources.csv", "t.csv", "t.md", "t.tex"]
    with pytest.raises(ValueError, match="Table 'u' has no sources"):
        write_table(tmp_path, "u", Table(table.values, cells))


def test_git_dirty_flag_counts_untracked_files(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    clean = git_commit(tmp_path)
    assert len(clean) == 40 and not clean.endswith("-dirty")
    (tmp_path / "new.txt").write_text("untracked")
    assert git_commit(tmp_path) == f"{clean}-dirty"


def test_package_versions_cover_the_stack():
    versions = package_versions()
    for name in ("torch", "transformers", "peft", "scikit-learn", "faiss-cpu", "accelerate", "datasets"):
        assert versions[name], name
    assert "faiss-gpu" in versions


def test_scalar_metrics_for_trackers():
    from experiments.pipeline.tracking import scalar_metrics

    metrics = {"objective": "emo", "mauve": {"mean": 0.9, "std": 0.1, "values": [0.8, 1.0]}, "test_perplexity": 30.0,
               "train": {"global_step": 2, "resumed_from": None, "flag": True}, "oracle": {"tvd": 0.2}}
    assert scalar_metrics(metrics) == {"mauve.mean": 0.9, "mauve.std": 0.1, "test_perplexity": 30.0,
                                       "train.global_step": 2, "oracle.tvd": 0.2}
