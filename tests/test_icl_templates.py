"""Track 2 ICL tasks: golden prompts of the seven paper templates, task configs, fixtures and config errors."""

import pytest
from omegaconf import OmegaConf

from experiments.pipeline.icl import ICLConfigError, Task, load_task, render_context, render_prompt, task_names
from tests.conftest import require_data

# One test input, two retrieved pool rows (most similar first) per task, and the prompt expected for one label, written
# by hand from the reference templates (the paper's OpenICL script): `</E>` -> examples + "\n", `<X>` -> text.
GOLDEN = {
    "tweet_eval": (
        [("so angry at the bus", 0), ("best day ever", 1)], "rain again", 3,
        "so angry at the bus It is anger.\nbest day ever It is joy.\nrain again It is sadness."),
    "trec": (
        [("Who wrote Hamlet ?", 3), ("What does NASA stand for ?", 0)], "Where is Boston ?", 4,
        '"Who wrote Hamlet ?" It is about human being.\n"What does NASA stand for ?" It is about abbreviation.\n'
        '"Where is Boston ?" It is about location.'),
    "sst2": (
        [("a dull mess", 1), ("warm and funny", 0)], "a gripping film", 0,
        'Review: "a dull mess" It is negative.\nReview: "warm and funny" It is positive.\n'
        'Review: "a gripping film" It is positive.'),
    "subj": (
        [("the film follows a young pilot .", 0), ("a lovely , moving story .", 1)], "it is set in paris .", 1,
        "the film follows a young pilot . It is objective.\na lovely , moving story . It is subjective.\n"
        "it is set in paris . It is subjective."),
    "cr": (
        [("the battery dies fast .", 0), ("great screen .", 1)], "works as advertised .", 1,
        "Review: the battery dies fast . It is negative.\nReview: great screen . It is positive.\n"
        "Review: works as advertised . It is positive."),
    "rt": (
        [("a tedious slog .", 0), ("a charming romp .", 1)], "smart and sharp .", 0,
        "Review: a tedious slog . It is negative\nReview: a charming romp . It is positive\n"
        "Review: smart and sharp . It is negative"),
    "ag_news": (
        [("Stocks fall as oil rises", 2), ("New chip doubles speed", 3)], "Team wins the cup", 1,
        '"Stocks fall as oil rises" It is about business.\n"New chip doubles speed" It is about science and '
        'technology.\n"Team wins the cup" It is about sports.'),
}
LABEL_ORDER = {"tweet_eval": [0, 1, 2, 3], "trec": [0, 1, 2, 3, 4, 5], "sst2": [0, 1], "subj": [0, 1], "cr": [1, 0],
               "rt": [1, 0], "ag_news": [0, 1, 2, 3]}
LABEL_COLUMN = {"trec": "coarse_label"}


@pytest.fixture
def paper_icl(compose_cfg):
    cfg = compose_cfg("experiment=icl_eval", "model=tiny_llama")
    return OmegaConf.to_container(cfg.icl, resolve=True)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_paper_template_renders_the_reference_prompt(paper_icl, name):
    spec = paper_icl["task_specs"][name]
    column = LABEL_COLUMN.get(name, "label")
    examples, text, label, expected = GOLDEN[name]
    pool = [{"text": t, column: y} for t, y in examples]
    task = Task(name, pool=pool, test=[{"text": text, column: label}], templates=spec["templates"],
                label_column=spec["label_column"])
    assert task.labels == LABEL_ORDER[name]
    context = render_context(task, [0, 1], paper_icl["ice_separator"], paper_icl["ice_eos_token"])
    assert render_prompt(task, task.test[0], context, label) == expected


def test_paper_protocol_config(paper_icl):
    assert paper_icl["tasks"] == ["tweet_eval", "trec", "sst2", "subj", "cr", "rt", "ag_news"]
    assert paper_icl["ice_num"] == 8 and paper_icl["source"] == "hub"
    assert paper_icl["retriever"]["model"].endswith("all-mpnet-base-v2")
    assert paper_icl["retriever"]["tokenizer"].endswith("gpt2-xl")
    assert paper_icl["ice_separator"] == "\n" and paper_icl["ice_eos_token"] == "\n"
    assert paper_icl["task_specs"]["ag_news"]["pool_fraction"] == 0.3
    assert paper_icl["task_specs"]["sst2"]["hub"]["path"] == "gpt3mix/sst2"
    assert paper_icl["task_specs"]["trec"]["label_column"] == "coarse_label"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_fixture_slices_load_with_their_templates(paper_icl, name):
    require_data(f"fewshot/{name}")
    task = load_task(name, paper_icl["task_specs"][name], source="local")
    pool_size = 90 if name == "ag_news" else 300  # AG News: first 30% of the 300 train rows
    assert (len(task.pool), len(task.test)) == (pool_size, 120)
    assert {task.gold(row) for row in task.test} <= set(task.labels)


def test_sst2_fixture_uses_gpt3mix_label_order(paper_icl):
    task = load_task("sst2", paper_icl["task_specs"]["sst2"], source="local")
    labels = {r["text"]: r["label"] for r in task.pool}
    assert labels["the film is strictly routine ."] == 1  # negative
    assert labels["the characters are more deeply thought through than in most ` right-thinking ' films ."] == 0


def test_unknown_task_lists_known_ones(paper_icl):
    with pytest.raises(ICLConfigError, match=r"Unknown ICL task\(s\) \['sst5'\].*'ag_news'"):
        task_names({**paper_icl, "tasks": ["sst2", "sst5"]})


def test_labels_without_template_are_refused(tmp_path):
    rows = "".join(f'{{"text": "t{i}", "label": {i % 3}}}\n' for i in range(6))
    (tmp_path / "train.jsonl").write_text(rows)
    (tmp_path / "test.jsonl").write_text(rows)
    spec = {"data_files": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
            "templates": {0: "</E><X> no", 1: "</E><X> yes"}}
    with pytest.raises(ICLConfigError, match=r"labels \['2'\] of the train split have no template"):
        load_task("mine", spec, source="local")


def test_template_without_marker_and_missing_columns(tmp_path):
    (tmp_path / "d.csv").write_text("sentence,label\nhello,0\nbye,1\n")
    files = {"train": str(tmp_path / "d.csv"), "test": str(tmp_path / "d.csv")}
    with pytest.raises(ICLConfigError, match="no column"):
        load_task("mine", {"data_files": files, "templates": {0: "</E><X> a", 1: "</E><X> b"}})
    with pytest.raises(ICLConfigError, match="lacks the in-context marker"):
        load_task("mine", {"data_files": files, "input_columns": {"sentence": "<X>"},
                           "templates": {0: "<X> a", 1: "</E><X> b"}})


def test_user_task_from_csv_with_string_labels(tmp_path):
    (tmp_path / "train.csv").write_text("review,stars\ngood,pos\nbad,neg\nfine,pos\n")
    (tmp_path / "test.csv").write_text("review,stars\nawful,neg\n")
    spec = {"data_files": {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")},
            "input_columns": {"review": "<X>"}, "label_column": "stars",
            "templates": {"pos": "</E>Review: <X> Good.", "neg": "</E>Review: <X> Bad."}}
    task = load_task("stars", spec, source="hub")  # no hub entry: local files are used
    context = render_context(task, [1, 0])
    assert render_prompt(task, task.test[0], context, "neg") == \
        "Review: bad Bad.\nReview: good Good.\nReview: awful Bad."


def test_task_from_the_command_line(compose_cfg, tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "x", "label": 0}\n{"text": "y", "label": 1}\n')
    cfg = compose_cfg("experiment=icl_tiny", "icl.tasks=[mine]",
                      f"+icl.task_specs.mine={{data_files: {{train: {tmp_path}/t.jsonl, test: {tmp_path}/t.jsonl}}, "
                      "templates: {0: '</E><X> no', 1: '</E><X> yes'}}")
    icl = OmegaConf.to_container(cfg.icl, resolve=True)
    assert task_names(icl) == ["mine"]
    task = load_task("mine", icl["task_specs"]["mine"], icl["source"])
    assert [task.gold(r) for r in task.test] == [0, 1]
