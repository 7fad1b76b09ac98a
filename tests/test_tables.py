"""`make tables` (`python -m experiments.tables`) over hand-made result folders with known numbers: every track's
table as md, csv and booktabs LaTeX, best in bold, missing cells shown as missing, seeds pooled, `sources.csv` naming
the runs behind each cell, empty and partial results folders, and atomic writes."""

import csv
import math
import statistics

import pandas as pd
import pytest

from experiments.pipeline import records
from experiments.pipeline.records import write_run
from experiments.tables import main as tables_main

TABLES = ("lm_mauve_gpt2", "lm_perplexity_gpt2", "lm_mauve_opt-125m", "lm_perplexity_opt-125m", "icl_accuracy",
          "instruct_winrate", "demo")


def lm_run(root, run_id, model, corpus, objective, *, seed, mauve, ppl, rep_2, experiment="lm_gpt2"):
    """A Track 1 run: MAUVE and seq-rep-2 per sampling seed, test perplexity; the human text's rep-2 is 0.1."""
    metrics = {"experiment": experiment, "run_id": run_id, "model": model, "corpus": corpus, "objective": objective,
               "mauve": {"mean": statistics.fmean(mauve), "std": statistics.stdev(mauve) if len(mauve) > 1 else 0.0,
                         "values": mauve}, "test_perplexity": ppl,
               "diversity": {"rep_2": {"mean": 0.0, "std": 0.0, "values": rep_2},
                             "rep_3": {"mean": 0.0, "std": 0.0, "values": [0.0] * len(rep_2)}},
               "gold_diversity": {"rep_2": 0.1, "rep_3": 0.0}}
    manifest = {"setup": {"model.name": model, "data.name": corpus, "objective.name": objective},
                "seeds": {"training": seed}}
    write_run(root, experiment, run_id, metrics=metrics, manifest=manifest)


def icl_run(root, run_id, objective, accuracies):
    tasks = {task: {"accuracy": accuracy, "n": 100, "stderr": math.sqrt(accuracy * (1 - accuracy) / 100)}
             for task, accuracy in accuracies.items()}
    metrics = {"experiment": "cft_lora", "run_id": run_id, "model": "llama7b", "objective": objective,
               "icl": {"shots": 8, "source": "hub", "retriever": {"model": "all-mpnet-base-v2"}, "tasks": tasks}}
    write_run(root, "cft_lora", run_id, metrics=metrics, manifest={})


def judged_run(root, run_id, objective, win_rate):
    metrics = {"experiment": "judge", "run_id": run_id, "model": "llama7b", "objective": objective,
               "reference_generator": "llama7b_mle", "judge": "gpt-4", "template": "alpaca_eval", "positions": "both",
               "win_rate": win_rate, "win_rate_se": 0.05, "length_controlled": {"win_rate": win_rate - 0.05},
               "wins": 6, "ties": 0, "losses": 4, "unparseable": 0, "n_judged": 10, "n_pairs": 10}
    write_run(root, "judge", run_id, metrics=metrics, manifest={})


def oracle_run(root, run_id, objective, forward_kl):
    distinct = {"distinct_1": 0.2, "distinct_2": 0.7}
    metrics = {"experiment": "demo", "run_id": run_id, "model": "oracle_gpt2", "corpus": "oracle",
               "objective": objective, "mauve": {"mean": 0.9, "std": 0.01, "values": [0.89, 0.91]},
               "test_perplexity": 50.0, "diversity": {k: {"mean": v, "std": 0.0, "values": [v]} for k, v in
                                                       distinct.items()},
               "gold_diversity": distinct, "oracle": {"forward_kl": forward_kl, "reverse_kl": 0.8, "tvd": 0.3,
                                                      "perplexity": 50.0, "oracle_cross_entropy": 3.6}}
    write_run(root, "demo", run_id, metrics=metrics, manifest={})


@pytest.fixture
def results(tmp_path):
    """Every track: gpt2 with two seeds of mle on wikitext2 and no mle run on ptb, an opt-125m run, a base model and
    two fine-tuned ICL rows, a judged run, and two oracle runs."""
    root = tmp_path / "results"
    lm_run(root, "mle_wt2_s1", "gpt2", "wikitext2", "mle", seed=1, mauve=[0.80, 0.82], ppl=30.0, rep_2=[0.2, 0.2])
    lm_run(root, "mle_wt2_s2", "gpt2", "wikitext2", "mle", seed=2, mauve=[0.84, 0.86], ppl=32.0, rep_2=[0.2, 0.2])
    lm_run(root, "emo_wt2", "gpt2", "wikitext2", "emo", seed=1, mauve=[0.90, 0.92], ppl=29.0, rep_2=[0.15, 0.05])
    lm_run(root, "emo_ptb", "gpt2", "ptb", "emo", seed=1, mauve=[0.70, 0.74], ppl=40.0, rep_2=[0.3, 0.3])
    lm_run(root, "opt_emo", "opt-125m", "wikitext2", "emo", seed=1, mauve=[0.5, 0.5], ppl=35.0, rep_2=[0.1, 0.1],
           experiment="lm_opt")
    icl_run(root, "base", None, {"sst2": 0.80, "rt": 0.70})
    icl_run(root, "mle", "mle", {"sst2": 0.85, "rt": 0.75})
    icl_run(root, "emo2", "emo2", {"sst2": 0.90, "rt": 0.72})
    judged_run(root, "emo_vs_mle", "emo", 0.6)
    oracle_run(root, "o_mle", "mle", 0.4)
    oracle_run(root, "o_emo", "emo", 0.5)
    return root


def read_sources(root):
    with open(root / "tables" / "sources.csv", newline="") as stream:
        lines = list(csv.reader(stream))
    assert lines[0] == ["table", "row", "column", "run_ids"]
    return {(table, row, column): run_ids for table, row, column, run_ids in lines[1:]}


def markdown_rows(path):
    """`{row label: [cells]}` of a written markdown table, the header row included."""
    lines = path.read_text().split("\n\n", 1)[1].splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]
    return {row[0]: row[1:] for row in rows}


def test_make_tables_writes_every_table_with_sources(results, capsys):
    assert tables_main(["--results-dir", str(results)]) == 0
    out = results / "tables"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        ["sources.csv", *(f"{name}.{suffix}" for name in TABLES for suffix in ("md", "csv", "tex"))])
    assert f"Wrote {len(TABLES)} table(s) from all experiments" in capsys.readouterr().out

    mauve = (out / "lm_mauve_gpt2.md").read_text()
    assert mauve.startswith("MAUVE ↑ of gpt2 fine-tuned with each objective (mean ± std over sampling seeds); 4 "
                            "runs of experiment lm_gpt2; best per corpus in bold; (n=k): k runs pooled that differ "
                            "only in their seeds; –: no result.\n\n")
    assert mauve.endswith("| mle         | 0.830 ± 0.026 (n=2) | –                 |\n"  # pooled 0.80 .. 0.86
                          "| emo         | **0.910 ± 0.014**   | **0.720 ± 0.028** |\n")
    values = pd.read_csv(out / "lm_mauve_gpt2.csv", index_col=0)
    assert list(values.columns) == ["wikitext2 mean", "wikitext2 std", "wikitext2 runs", "ptb mean", "ptb std",
                                    "ptb runs"]
    assert values.loc["mle", "wikitext2 mean"] == pytest.approx(0.83)
    assert values.loc["mle", "wikitext2 runs"] == 2 and math.isnan(values.loc["mle", "ptb mean"])
    tex = (out / "lm_mauve_gpt2.tex").read_text()
    assert [line for line in tex.splitlines() if line.endswith("rule")] == [r"\toprule", r"\midrule", r"\bottomrule"]
    assert r"mle & 0.830 $\pm$ 0.026 (n=2) & -- \\" in tex and r"\textbf{0.910 $\pm$ 0.014}" in tex

    assert markdown_rows(out / "lm_perplexity_gpt2.md") == {  # diversity = (1 - rep-2)(1 - rep-3), best = closest
        "objective": ["wikitext2 PPL ↓", "wikitext2 diversity", "ptb PPL ↓", "ptb diversity"],
        "mle": ["31.00 ± 1.41 (n=2)", "0.800 ± 0.000 (n=2)", "–", "–"],
        "emo": ["**29.00**", "**0.900 ± 0.071**", "**40.00**", "**0.700 ± 0.000**"],
        "human (reference)": ["–", "0.900", "–", "0.900"]}
    assert pd.read_csv(out / "lm_perplexity_gpt2.csv", index_col=0).columns[:4].tolist() == [
        "wikitext2 perplexity mean", "wikitext2 perplexity std", "wikitext2 perplexity runs",
        "wikitext2 diversity mean"]
    assert "| emo         | **0.500 ± 0.000** |" in (out / "lm_mauve_opt-125m.md").read_text()

    assert markdown_rows(out / "icl_accuracy.md") == {
        "model": ["sst2", "rt", "average"],
        "llama7b": ["80.0 ± 4.0", "70.0 ± 4.6", "75.0"],  # the base model's row
        "llama7b + emo2": ["**90.0 ± 3.0**", "72.0 ± 4.5", "**81.0**"],
        "llama7b + mle": ["85.0 ± 3.6", "**75.0 ± 4.3**", "80.0"]}
    assert markdown_rows(out / "instruct_winrate.md")["llama7b / emo vs llama7b_mle"] == ["60.0 ± 5.0", "55.0"]
    demo = markdown_rows(out / "demo.md")
    assert demo["objective"][:2] == ["forward KL ↓", "reverse KL ↓"] and demo["mle"][0] == "**0.400**"
    assert "2 runs of experiment demo" in (out / "demo.md").read_text()

    sources = read_sources(results)
    n_cells = 0
    for name in TABLES:
        header, *body = markdown_rows(out / f"{name}.md").values()
        n_cells += len(body) * len(header)
    assert len(sources) == n_cells  # one line per cell
    assert sources[("lm_mauve_gpt2", "mle", "wikitext2")] == "lm_gpt2/mle_wt2_s1;lm_gpt2/mle_wt2_s2"
    assert sources[("lm_mauve_gpt2", "mle", "ptb")] == ""
    assert sources[("lm_perplexity_gpt2", "human (reference)", "wikitext2 diversity")] == (
        "lm_gpt2/emo_wt2;lm_gpt2/mle_wt2_s1;lm_gpt2/mle_wt2_s2")
    assert sources[("lm_mauve_opt-125m", "emo", "wikitext2")] == "lm_opt/opt_emo"
    assert sources[("icl_accuracy", "llama7b", "average")] == "cft_lora/base"
    assert sources[("icl_accuracy", "llama7b + emo2", "rt")] == "cft_lora/emo2"
    assert sources[("instruct_winrate", "llama7b / emo vs llama7b_mle", "gpt-4 (alpaca_eval) LC")] == (
        "judge/emo_vs_mle")
    assert sources[("demo", "emo", "forward KL ↓")] == "demo/o_emo"
    assert sources[("demo", "oracle (reference)", "perplexity ↓")] == "demo/o_emo;demo/o_mle"


def test_tables_over_empty_and_partial_results(tmp_path, capsys):
    assert tables_main(["--results-dir", str(tmp_path / "none")]) == 0
    assert "nothing written" in capsys.readouterr().out and not (tmp_path / "none").exists()

    icl_run(tmp_path, "base", None, {"sst2": 0.5})
    assert tables_main(["--results-dir", str(tmp_path)]) == 0
    assert "icl_accuracy. No runs for: lm, instruct, demo." in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "tables").iterdir() if not p.name.startswith(".")) == [
        "icl_accuracy.csv", "icl_accuracy.md", "icl_accuracy.tex", "sources.csv"]

    lm_run(tmp_path, "emo", "gpt2", "ptb", "emo", seed=1, mauve=[0.5], ppl=30.0, rep_2=[0.1])
    assert tables_main(["--results-dir", str(tmp_path), "--experiment", "lm_gpt2"]) == 0
    sources = read_sources(tmp_path)  # one experiment's tables replace only their own lines
    assert sources[("icl_accuracy", "llama7b", "sst2")] == "cft_lora/base"
    assert sources[("lm_mauve_gpt2", "emo", "ptb")] == "lm_gpt2/emo"
    assert tables_main(["--results-dir", str(tmp_path), "--experiment", "lm_typo"]) == 1


def test_table_files_are_replaced_atomically(results, monkeypatch):
    assert tables_main(["--results-dir", str(results)]) == 0
    out = results / "tables"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(records.os, "replace", failing_replace)  # records.atomic_file
    with pytest.raises(OSError, match="disk full"):
        tables_main(["--results-dir", str(results)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old files intact, no temporary file left
