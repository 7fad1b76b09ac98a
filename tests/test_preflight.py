"""`preflight=true` and the checks recipes run at their start: every remote resource of a composed run is looked up on
the loopback Hub (tests/loopback_hub.py) with the real clients, without downloading weights; gated, missing and
script-only resources fail with what to do; offline, the command says so within seconds. Also the bad-input errors
that would otherwise surface after training."""

import io
import subprocess
import sys
import time

import pytest

from experiments.pipeline import preflight
from experiments.pipeline.data import DataError, load_text_splits
from experiments.pipeline.icl import ICLConfigError, task_names
from experiments.pipeline.instruct import InstructionDataError, load_instruction_records
from helpers import run_env
from loopback_hub import on_loopback, online_env
from tests.conftest import REPO_ROOT

TREC_FILES = {"train": "https://cogcomp.seas.upenn.edu/Data/QA/QC/train_5500.label",
              "test": "https://cogcomp.seas.upenn.edu/Data/QA/QC/TREC_10.label"}
ICL_ROLES = [*(f"icl.task_specs.{t}.hub" for t in ("tweet_eval", "sst2", "subj", "cr", "rt", "ag_news")),
             "icl.task_specs.trec.hub.files.train", "icl.task_specs.trec.hub.files.test", "icl.retriever.model",
             "icl.retriever.tokenizer"]
# experiment overrides -> the resources (config keys) its preflight table must list
EXPERIMENTS = {
    "icl_eval": (["experiment=icl_eval", "model=llama7b"], ["model.name_or_path", "model.tokenizer", *ICL_ROLES]),
    "cft_lora": (["experiment=cft_lora"], ["model.name_or_path", "model.tokenizer", "data.path", *ICL_ROLES]),
    "lm_gpt2_webtext": (["experiment=lm_gpt2", "data=webtext"],
                        ["model.name_or_path", "model.tokenizer", "data.data_files.train", "data.data_files.test",
                         "metrics.featurizer"]),
    "sft_alpaca": (["experiment=sft_alpaca"], ["model.name_or_path", "model.tokenizer", "instructions.path",
                                               "eval_instructions.filename"]),
    "judge": (["experiment=judge"], ["judge.base_url", "pairwise.model_outputs", "pairwise.reference_outputs"]),
}


def loopback_overrides(hub, experiment: str, tmp_path) -> list[str]:
    """Overrides moving the non-Hub hosts of an experiment to the loopback's other origin (same paths)."""
    if experiment in ("icl_eval", "cft_lora"):
        return [f"icl.task_specs.trec.hub.files.{s}={on_loopback(hub, url)}" for s, url in TREC_FILES.items()]
    if experiment == "lm_gpt2_webtext":
        base = "https://openaipublic.blob.core.windows.net/gpt-2/output-dataset/v1"
        return [f"data.data_files.{s}={on_loopback(hub, f'{base}/webtext.{f}.jsonl')}"
                for s, f in (("train", "valid"), ("test", "test"))]
    if experiment == "judge":
        for name in ("model", "reference"):
            (tmp_path / f"{name}.json").write_text("[]")
        return [f"judge.base_url={hub.cdn}/v1", f"pairwise.model_outputs={tmp_path}/model.json",
                f"pairwise.reference_outputs={tmp_path}/reference.json"]
    return []


def rows_of(cfg) -> dict:
    return {row.resource.role: row for row in preflight.check(preflight.resources(cfg))}


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_preflight_table_lists_every_resource_and_downloads_no_weights(experiment, hub_online, compose_cfg,
                                                                        tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", hub_online.openai_key)
    overrides, roles = EXPERIMENTS[experiment]
    cfg = compose_cfg(*overrides, *loopback_overrides(hub_online, experiment, tmp_path))
    before = len(hub_online.requests)
    out = io.StringIO()
    status = preflight.report(cfg, stream=out)
    table = out.getvalue()
    for role in roles:
        assert f"\n{role}: " in table, (role, table)
    assert status == 0, table
    assert " failed" not in table.split("\n", 2)[2].replace("0 failed", "")
    served = [path for _, method, path in hub_online.requests[before:] if method == "GET"]
    assert not [p for p in served if p.startswith("/lfs/") or p.endswith((".safetensors", ".bin", ".parquet"))]


def test_pinned_commits_show_in_the_table(hub_online, compose_cfg):
    cfg = compose_cfg("experiment=icl_eval", "model=llama7b")
    rows = rows_of(cfg)
    assert rows["model.name_or_path"].commit == cfg.model.revision
    sst2 = rows["icl.task_specs.sst2.hub"]
    assert sst2.commit == hub_online.commit("dataset", "gpt3mix/sst2", "refs/convert/parquet")
    assert "columns text, label declared" not in sst2.note  # the parquet export has no card: nothing claimed


@pytest.mark.parametrize("token", [None, "hf_without_access"])
def test_a_gated_model_reads_as_gated(token, hub_online, compose_cfg, monkeypatch):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    row = rows_of(compose_cfg("experiment=icl_eval", "model=llama2_7b"))["model.name_or_path"]
    assert row.status == preflight.FAILED and "needs a token and an accepted licence" in row.note
    assert "meta-llama/Llama-2-7b-hf" in row.note and "hf auth login" in row.note


def test_a_gated_model_with_an_accepted_licence_is_ok(hub_online, compose_cfg, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub_online.granted_token)
    row = rows_of(compose_cfg("experiment=icl_eval", "model=llama2_7b"))["model.name_or_path"]
    assert row.status == preflight.OK and row.note.startswith("gated, access granted")


@pytest.mark.parametrize("override, role, message", [
    ("model.name_or_path=emo-tests/no-such-model", "model.name_or_path", "does not exist on the Hub"),
    ("model.revision=" + "0" * 40, "model.name_or_path", "has no such revision"),
    ("+icl.task_specs.trec.hub={path: CogComp/trec}", "icl.task_specs.trec.hub", r"loading script \(trec.py\)"),
    ("icl.task_specs.rt.label_column=polarity", "icl.task_specs.rt.hub", r"no column\(s\) \['polarity'\]"),
    ("icl.task_specs.tweet_eval.hub.name=emoji", "icl.task_specs.tweet_eval.hub", "no config 'emoji'"),
    ("icl.task_specs.ag_news.hub.label_names=[Sports,World,Business,Sci/Tech]", "icl.task_specs.ag_news.hub",
     "differ from the templates"),
    ("icl.task_specs.subj.test_split=dev", "icl.task_specs.subj.hub", r"no split\(s\) \['dev'\]"),
])
def test_an_unusable_resource_fails_its_row(override, role, message, hub_online, compose_cfg):
    import re

    overrides = ["experiment=icl_eval", "model=llama7b", override]
    if "trec.hub=" in override:  # replace TREC's files node by a Hub dataset node
        overrides = ["experiment=icl_eval", "model=llama7b", "~icl.task_specs.trec.hub", override]
    cfg = compose_cfg(*overrides)
    row = rows_of(cfg)[role]
    assert row.status == preflight.FAILED and re.search(message, row.note), row.note
    assert preflight.report(cfg, stream=io.StringIO()) == 1


def test_judge_endpoint_with_a_refused_key_or_an_unknown_model_fails(hub_online, compose_cfg, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    cfg = compose_cfg("experiment=sft_alpaca", "+judge=openai", f"judge.base_url={hub_online.cdn}/v1")
    row = rows_of(cfg)["judge.base_url"]
    assert row.status == preflight.FAILED and "refused the key in OPENAI_API_KEY" in row.note
    assert "sk-wrong" not in row.note
    monkeypatch.setenv("OPENAI_API_KEY", hub_online.openai_key)
    cfg = compose_cfg("experiment=sft_alpaca", "+judge=openai", f"judge.base_url={hub_online.cdn}/v1",
                      "judge.model=gpt-5")
    assert "serves no model 'gpt-5'" in rows_of(cfg)["judge.base_url"].note


def test_judge_endpoint_with_credentials_in_its_url_never_shows_them(hub_online, compose_cfg, monkeypatch):
    """A base URL holding user:password (OPENAI_BASE_URL, as the judge docs advise) is requested with them (the
    loopback server then sees HTTP basic auth instead of the bearer key, and refuses it), and the table names only
    the URL's public part."""
    monkeypatch.setenv("OPENAI_API_KEY", hub_online.openai_key)
    monkeypatch.setenv("OPENAI_BASE_URL", hub_online.cdn.replace("http://", "http://judge-user:s3cret-pass@") + "/v1")
    cfg = compose_cfg("experiment=sft_alpaca", "+judge=openai")
    row = rows_of(cfg)["judge.base_url"]
    assert row.resource.name == f"{hub_online.cdn}/v1" and row.status == preflight.FAILED
    assert "refused" in row.note and any(method == "GET" and path == "/v1/models"
                                         for origin, method, path in hub_online.requests)
    table = io.StringIO()
    preflight.report(cfg, stream=table)
    assert "s3cret-pass" not in table.getvalue() and "judge-user" not in table.getvalue()


def test_webtext_row_is_ok_through_its_fallback(hub_online, compose_cfg):
    base = "/gpt-2/output-dataset/v1/webtext.valid.jsonl"
    cfg = compose_cfg("experiment=lm_gpt2", "data=webtext", f"data.data_files.train=http://127.0.0.1:9{base}",
                      f"data.fallback_data_files.train={hub_online.cdn}{base}")
    row = rows_of(cfg)["data.data_files.train"]
    assert row.status == preflight.OK and "fallback" in row.note


def test_preflight_command_offline_says_so_within_seconds(tmp_path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "run.py", "experiment=icl_eval", "model=llama7b", "preflight=true"],
                            cwd=REPO_ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 1 and elapsed < 20, (elapsed, result.stderr[-2000:])
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("preflight: offline -- none of the 12 resources could be checked")
    assert sum(" not checked " in line for line in lines) == 12


def test_preflight_command_against_the_loopback_hub(loopback_hub, tmp_path):
    overrides = loopback_overrides(loopback_hub, "icl_eval", tmp_path)
    env = {**online_env(loopback_hub, tmp_path / "hf"), "EMO_LOG_DIR": str(tmp_path / "logs")}
    result = subprocess.run([sys.executable, "run.py", "experiment=icl_eval", "model=llama7b", "preflight=true",
                             *overrides], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "preflight: 12 resources, 12 ok, 0 failed, 0 not checked"


@pytest.mark.parametrize("where", ["local", "hub"])
def test_cft_tiny_stops_before_training_when_an_icl_task_cannot_be_read(where, hub_online, compose_cfg, tmp_path):
    from experiments.cft import run

    broken = ("icl.task_specs.sst2.data_files.test=/nonexistent/sst2_test.jsonl" if where == "local" else
              "icl.task_specs.sst2.hub.path=emo-tests/no-such-dataset")
    source = ["icl.source=hub", "icl.tasks=[sst2]"] if where == "hub" else []
    cfg = compose_cfg("experiment=cft_tiny", broken, *source, f"paths.results_dir={tmp_path}/res",
                      f"paths.output_dir={tmp_path}/out", f"paths.cache_dir={tmp_path}/cache")
    with pytest.raises(preflight.PreflightError, match="icl.task_specs.sst2"):
        run(cfg)
    checkpoints = tmp_path / "out" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
    assert not (tmp_path / "res").exists()


# --------------------------------------------------------------------------------- bad input, refused before work
@pytest.mark.parametrize("shots", [0, -1])
def test_non_positive_ice_num_is_refused(shots, compose_cfg):
    from omegaconf import OmegaConf

    icl = OmegaConf.to_container(compose_cfg("experiment=icl_tiny", f"icl.ice_num={shots}").icl, resolve=True)
    with pytest.raises(ICLConfigError, match=rf"icl.ice_num .* positive integer; got {shots}"):
        task_names(icl)


@pytest.mark.parametrize("overrides, message", [
    (["experiment=sft_tiny", "instructions.path=vicgalle/alpaca-gpt4"],
     r"instructions.path is only used when reading the Hub, but instructions.source='files'"),
    (["experiment=sft_tiny", "instructions=alpaca_gpt4", "instructions.data_files=/tmp/a.json"],
     r"instructions.data_files is only used when reading files, but instructions.source='hub'"),
])
def test_a_field_of_the_other_source_is_refused_for_instructions(overrides, message, compose_cfg):
    with pytest.raises(InstructionDataError, match=message):
        load_instruction_records(compose_cfg(*overrides).instructions)


def test_a_field_of_the_other_source_is_refused_for_corpora(compose_cfg, wikitext_dir):
    cfg = compose_cfg("experiment=lm_tiny", "data=wikitext2", "data.source=files",
                      f"data.data_files={{train: {wikitext_dir}/wiki.valid.head1200.raw}}")
    with pytest.raises(DataError, match=r"data.path, data.config_name, data.revision are only used when reading the "
                                        r"Hub"):
        load_text_splits(cfg.data)
    with pytest.raises(DataError, match=r"data.data_files is only used when reading files, but data.source='hub'"):
        load_text_splits(compose_cfg("experiment=lm_tiny", "data=wikitext2", "data.data_files={train: x.txt}").data)
