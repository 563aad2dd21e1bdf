"""``opsd eval`` on a tiny random HF model with the shipped tokenizer and arithmetic problems (in process)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

from megatron_opsd.cli import main
from megatron_opsd.config import config_keys, load_config
from megatron_opsd.eval.cli import EvalRunConfig

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = str(REPO / "data" / "arith" / "test.jsonl")
FAST = ["--k", "2", "eval.max_new_tokens=8", "limit=3"]


def save_tiny_chat_model(out: Path) -> Path:
    """A random 2-layer Qwen3 over the shipped tokenizer's vocabulary, saved with that tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tokenizer")
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         architectures=["Qwen3ForCausalLM"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("eval") / "hf")


def _rows(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_eval_writes_the_report(model_dir, tmp_path, capsys):
    out, config = tmp_path / "report.json", tmp_path / "eval.yaml"
    config.write_text("limit: 3\neval: {max_new_tokens: 8, temperature: 0.7}\n")
    assert main(["eval", str(model_dir), "--config", str(config), "--data", TEST_DATA, "--k", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == str(model_dir.resolve()) and report["data"].startswith(TEST_DATA)
    assert report["num_problems"] == 3 and report["k"] == 2 and report["config"]["max_new_tokens"] == 8
    assert report["config"]["temperature"] == 0.7
    assert set(report["metrics"]) == {"avg@2", "pass@1", "pass@2", "maj@2"}
    rows = report["problems"]
    assert [r["index"] for r in rows] == [0, 1, 2] and [r["reference"] for r in rows[:2]] == ["12", "20"]
    assert all(len(r["responses"]) == 2 and all(0 < n <= 8 for n in r["response_tokens"]) for r in rows)
    assert report["metrics"]["avg@2"] == pytest.approx(sum(sum(r["correct"]) for r in rows) / 6)
    summary = capsys.readouterr().out
    assert "3 problems x 2 samples" in summary and "avg@2 " in summary and f"report: {out}" in summary


def test_bad_dataset_row_names_the_row(model_dir, tmp_path, capsys):
    good = {"problem": "1 + 1?", "solution": "\\boxed{2}", "answer": "2"}
    path = _rows(tmp_path, [good, {**good, "solution": ""}])
    assert main(["eval", str(model_dir), "--data", path, *FAST]) == 2
    assert "row 1: field 'solution' (path 'solution') is empty" in capsys.readouterr().err


def test_ungradable_row_is_a_one_line_error(model_dir, tmp_path, capsys):
    rows = [{"problem": "1 + 1?", "solution": "\\boxed{2}"}, {"problem": "2 + 2?", "solution": "four"}]
    path = _rows(tmp_path, rows)
    assert main(["eval", str(model_dir), "--data", path, "data.fields.answer=null", *FAST]) == 2
    message = capsys.readouterr().err.partition("opsd: error: ")[2]  # after the data set loader's progress bar
    assert message.startswith(f"{path} [train]: row 1: no answer field") and message.count("\n") == 1


def test_prompt_without_room_to_answer_is_reported_before_sampling(model_dir, capsys):
    assert main(["eval", str(model_dir), "--data", TEST_DATA, "limit=1"]) == 2  # default max_new_tokens=38912
    err = capsys.readouterr().err
    assert "row 0: eval prompt of" in err and "eval.max_new_tokens=38912 exceed the model's max_position_embeddings=256" in err


def test_unknown_key_suggests_the_known_one(model_dir, capsys):
    assert main(["eval", str(model_dir), "--data", TEST_DATA, "eval.temprature=0"]) == 2
    assert "unknown key 'eval.temprature' (did you mean 'eval.temperature'?)" in capsys.readouterr().err


def test_not_a_model_directory(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--data", TEST_DATA]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is neither a Hugging Face model directory (config.json) nor a Megatron checkpoint" in err
    assert "a step_NNNNNN directory that opsd train writes" in err


def test_help_documents_every_config_key(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    keys = [k.key for k in config_keys(EvalRunConfig) if k.is_leaf]
    assert len(keys) > 30 and "eval.max_new_tokens" in keys and "data.fields.solution" in keys
    assert [k for k in keys if f"\n  {k} (" not in text] == []
    assert "  data.source ('local' | 'hub', default 'local')" in text


EVAL_CONFIGS = sorted((REPO / "examples" / "eval").glob("*.yaml"))


def test_the_paper_protocol_configs():
    assert {p.stem for p in EVAL_CONFIGS} == {"aime24", "aime25", "hmmt25", "math500"}
    for path in EVAL_CONFIGS:
        cfg = load_config(EvalRunConfig, path, [])
        assert cfg.data.source == "hub" and cfg.data.name and not cfg.data.shuffle, path
        assert cfg.data.fields.solution is None and cfg.data.fields.answer == "answer", path  # graded by answers only
        e = cfg.eval
        assert (e.k, e.temperature, e.top_p, e.top_k, e.max_new_tokens) == (12, 1.0, 0.95, -1, 38912), path
        assert e.pass_at_values() == [1, 2, 4, 8, 12]
        assert cfg.prompts.template == "v3" and cfg.prompts.eval_thinking, path


def test_a_protocol_config_on_a_local_copy_of_a_set_without_solutions(model_dir, tmp_path):
    from datasets import Dataset

    with open(TEST_DATA) as f:
        arith = [json.loads(next(f)) for _ in range(3)]
    local = tmp_path / "aime25.parquet"  # the hub set's columns: no solution
    Dataset.from_list([{"problem_idx": i + 1, "problem": r["problem"], "answer": r["answer"]}
                       for i, r in enumerate(arith)]).to_parquet(local)
    out = tmp_path / "report.json"
    assert main(["eval", str(model_dir), "--config", str(REPO / "examples" / "eval" / "aime25.yaml"), "--data",
                 str(local), "--k", "2", "eval.max_new_tokens=8", "engine.dtype=float32", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["data"].startswith(str(local)) and report["num_problems"] == 3
    assert set(report["metrics"]) == {"avg@2", "pass@1", "pass@2", "maj@2"}
    assert (report["config"]["temperature"], report["config"]["top_p"], report["config"]["top_k"]) == (1.0, 0.95, -1)
    assert [r["reference"] for r in report["problems"]] == [r["answer"] for r in arith]
    assert 0 < report["mean_response_tokens"] <= 8


def test_eval_through_a_server_fleet_reports_what_the_embedded_engine_does(model_dir, tmp_path):
    """The stand-in samples as the embedded engine does (the same seeds): the same report, from the HF
    directory and from a Megatron checkpoint exported for the servers; no server outlives the run."""
    from tests.support.processes import processes_matching

    common = ["--data", TEST_DATA, "--k", "2", "eval.max_new_tokens=8", "limit=3", "eval.temperature=0.7"]
    fleet = ["engine.kind=sglang", "engine.servers.count=1", "engine.servers.command=[python,-m,megatron_opsd.cli,serve]",
             "engine.servers.deterministic_inference=true",
             "engine.router.enabled=false", "engine.timeouts.startup_s=120"]
    assert main(["eval", str(model_dir), *common, "--out", str(tmp_path / "embedded.json")]) == 0
    megatron = tmp_path / "megatron"
    assert main(["convert", "hf-to-megatron", "--hf-dir", str(model_dir), "--out", str(megatron)]) == 0
    want = json.loads((tmp_path / "embedded.json").read_text())
    before = set(processes_matching("megatron_opsd.cli serve"))
    for name, source in (("hf", model_dir), ("megatron", megatron)):
        assert main(["eval", str(source), *common, *fleet, "--out", str(tmp_path / f"{name}.json")]) == 0
        got = json.loads((tmp_path / f"{name}.json").read_text())
        for key in ("metrics", "mean_response_tokens", "no_answer_rate", "truncated_rate"):
            assert got[key] == want[key], (name, key)
    assert set(processes_matching("megatron_opsd.cli serve")) <= before
