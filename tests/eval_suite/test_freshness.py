"""Nothing stored is reused for other weights or settings (issue 20 items 2 and 7, issue 23 items 4 and 8).

Stored results, samples, lm-eval's request cache and judge answers are keyed on a content hash of
the weights and every input; a mismatch is refused in one line naming ``--rerun``, which really
reruns. Resume files are not taken on trust. The judge cache is keyed on the model that answers.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import struct
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from test_judge_faults import mt_answers

from eval_suite.__main__ import main
from eval_suite.judge.server import Completion, JudgeServer
from eval_suite.records import RecordError, SampleStore


def retrain(model_dir: Path, seed: int) -> None:
    """New weights in the same folder: same config, tokenizer, file names and sizes; other values."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(AutoConfig.from_pretrained(model_dir)).save_pretrained(model_dir)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    return out


def weights_fingerprint(model_dir: Path) -> dict:
    from eval_suite.fingerprint import weights_fingerprint as fingerprint  # here: the module is new

    return fingerprint(model_dir)


def cli(*argv: str) -> str | None:
    """``eval-suite ARGV`` in this process; returns the one-line error it exits with, or None."""
    try:
        main(list(argv))
    except SystemExit as e:
        if e.code not in (0, None):
            return str(e.code)
    return None


def humaneval_only(model: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["all", str(model), "--run-dir", str(run_dir), "--allow-code-execution", "--device", "cpu",
            "--skip", "alpaca_eval_1", "alpaca_eval_2", "mt_bench", "nlp", "--limit", "1", "--temperatures", "0.7",
            "--max-new-tokens", "6", "--k", "1", "--workers", "1", *extra]


def result(run_dir: Path, benchmark: str = "humaneval") -> dict:
    return json.loads((run_dir / "results" / f"{benchmark}.json").read_text())


# ---- issue 20 item 2: the weights' content hash ----------------------------------------------------

@pytest.mark.parametrize("sampled", [False, True], ids=["whole-files", "sampled"])
def test_the_weights_hash_sees_new_weights_shards_bin_and_adapters(model_copy, tmp_path, monkeypatch, sampled):
    import torch
    from transformers import AutoModelForCausalLM

    from eval_suite import fingerprint

    if sampled:  # the tiny files take the path of a 13 GB checkpoint's: headers and samples, not every byte
        monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 0)
    pickled = tmp_path / "pickled"  # a torch.save checkpoint (zip), as older models ship
    shutil.copytree(model_copy, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(AutoModelForCausalLM.from_pretrained(model_copy).state_dict(), pickled / "pytorch_model.bin")
    first, first_bin = weights_fingerprint(model_copy), weights_fingerprint(pickled)
    assert first["sha256"] == weights_fingerprint(shutil.copytree(model_copy, tmp_path / "moved"))["sha256"]  # content, not path
    (model_copy / "trainer_state.json").write_text("{}")  # training leftovers are not the model
    assert weights_fingerprint(model_copy)["sha256"] == first["sha256"]
    assert ("3 samples per" in first["method"]) == sampled and ("3 samples per" in first_bin["method"]) == sampled
    retrain(model_copy, seed=1)
    model = AutoModelForCausalLM.from_pretrained(model_copy)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert weights_fingerprint(model_copy)["sha256"] != first["sha256"]
    assert weights_fingerprint(pickled)["sha256"] != first_bin["sha256"]

    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="200KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert weights_fingerprint(sharded)["sha256"] not in (weights_fingerprint(model_copy)["sha256"], first["sha256"])

    # An adapter folder stands for adapter + base: a new base under the same adapter hashes differently.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(model_copy)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    before = weights_fingerprint(adapter)
    retrain(model_copy, seed=2)
    assert weights_fingerprint(adapter)["sha256"] != before["sha256"]


def test_hashing_a_13_gb_checkpoint_reads_a_few_mib(tmp_path):
    # A 13.5 GB LLaMA-2-7B-shaped checkpoint (291 tensors, sparse on disk): a few MiB read, well under a second.
    big = tmp_path / "big"
    big.mkdir()
    header, offset = {}, 0
    for i in range(291):
        size = 2 * 4096 * (11008 if i % 9 in (4, 5, 6) else 4096)
        header[f"t{i}"] = {"dtype": "F16", "shape": [size // 2], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(big / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    start = time.perf_counter()
    info = weights_fingerprint(big)
    assert time.perf_counter() - start < 2.0 and info["bytes"] > 10 * 2**30 and info["bytes_read"] < 4 * 2**20
    with open(big / "model.safetensors", "r+b") as f:  # one tensor's first value changes
        f.seek(8 + len(raw) + header["t150"]["data_offsets"][0])
        f.write(b"\1")
    assert weights_fingerprint(big)["sha256"] != info["sha256"]


# ---- issue 20 items 2 and 7: refusal, --rerun, provenance ---------------------------------------------

def test_a_changed_setting_or_new_weights_is_refused_and_rerun_really_reruns(model_copy, tmp_path):
    run = tmp_path / "run"
    assert cli(*humaneval_only(model_copy, run, "--n", "2")) is None
    first = result(run)
    assert first["config"]["n_samples"] == 2

    refused = cli(*humaneval_only(model_copy, run, "--n", "3"))  # today: "results already in ...; skipped"
    assert refused is not None and "preflight failed" in refused, refused
    assert "n: 2 -> 3" in refused and "pass --rerun to run humaneval again" in refused
    assert result(run) == first

    retrain(model_copy, seed=7)  # new weights in the same folder, same settings
    refused = cli(*humaneval_only(model_copy, run, "--n", "2"))
    assert refused is not None and "weights: " in refused and "pass --rerun" in refused, refused

    assert cli(*humaneval_only(model_copy, run, "--n", "2", "--rerun")) is None
    second = result(run)
    rows = [json.loads(line) for line in (run / "humaneval" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and second["config"]["n_samples"] == 2
    replaced = list((run / "humaneval" / "replaced").iterdir())
    assert len(replaced) == 1 and {p.name for p in replaced[0].iterdir()} >= {"humaneval.json", "generations.jsonl"}

    # Two models never share a provenance record; each records what it was made with.
    p1, p2 = first["provenance"], second["provenance"]
    assert p1["model"]["sha256"] != p2["model"]["sha256"] and p1["key"] != p2["key"]
    assert p1["model"]["path"] == p2["model"]["path"] == str(model_copy)
    assert p2["inputs"]["weights"] == p2["model"]["sha256"] and p2["inputs"]["n"] == 2
    assert p2["protocol_preset"] == "default" and p2["backend"] == "hf"
    assert p2["dtype"] == {"requested": "auto", "loaded": "torch.float32"}
    assert p2["batch"]["batch_size"] == "auto" and p2["batch"]["batch_tokens"] == 16384
    assert p2["generation_sessions"] == [{k: p2["batch"][k] for k in p2["generation_sessions"][0]}]
    assert p2["command"][:3] == ["eval-suite", "all", str(model_copy)] and "--rerun" in p2["command"]
    assert p2["project"]["version"] and (p2["project"]["git_commit"] is None) == (not (REPO_ROOT / ".git").exists())

    # Same inputs again: reused, not rerun.
    assert cli(*humaneval_only(model_copy, run, "--n", "2")) is None
    assert result(run)["created"] == second["created"]


def test_another_model_in_the_same_run_dir_gets_no_lm_eval_cache_answers(tiny_model_dir, model_copy, tmp_path):
    from test_nlp import TINY_SUITE, write_local_tasks

    retrain(model_copy, seed=3)
    tasks = write_local_tasks(tmp_path)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(TINY_SUITE.model_dump()))
    run = tmp_path / "run"

    def loglikelihoods(model: Path) -> list:
        assert cli("nlp", "--model", str(model), "--run-dir", str(run), "--suite", str(suite), "--include-path",
                   str(tasks), "--no-builtin-tasks", "--tasks", "tiny_mc", "--limit", "2", "--batch-size", "2",
                   "--device", "cpu", "--log-samples") is None
        rows = [json.loads(line) for line in (run / "nlp" / "samples_tiny_mc.jsonl").read_text().splitlines()]
        return [row["resps"] for row in rows]

    first, second = loglikelihoods(tiny_model_dir), loglikelihoods(model_copy)
    assert first != second  # today the second model's requests are all answered from the first one's cache
    assert len(list((run / "nlp" / "lm_eval_cache").glob("*_rank0.db"))) == 2
    assert result(run, "nlp")["provenance"]["model"]["sha256"] == weights_fingerprint(model_copy)["sha256"]


# ---- issue 23 item 4: the judge cache is keyed on the model that answers --------------------------------

def rating_judge(name: str, rating: int):
    def judge(messages, max_tokens, temperature):
        return Completion(f"Rating: [[{rating}]]")

    judge.served_name = name  # what the server reports as the answering model
    return judge


def test_another_judge_behind_the_same_url_is_asked_again_and_recorded(tmp_path):
    answers, run = mt_answers(tmp_path, 2), tmp_path / "run"
    args = ["mt-bench", "judge", "--run-dir", str(run), "--answers", str(answers), "--limit", "2"]
    with JudgeServer(rating_judge("judge-a", 2)) as a:
        assert cli(*args, "--judge-base-url", a.url) is None
        port = a.httpd.server_address[1]
    assert result(run, "mt_bench")["headline"] == 2.0
    with JudgeServer(rating_judge("judge-b", 9), port=port) as b:  # same URL, same requested name, another model
        assert cli(*args, "--judge-base-url", b.url) is None
        assert b.state.answered - b.state.stats().get("probes", 0) == 4  # today: 0, all four from judge-a's cache
    second = result(run, "mt_bench")
    assert second["headline"] == 9.0 and second["config"]["judge_model_reported"] == "judge-b"
    assert second["config"]["judge_cache_hits"] == 0
    with JudgeServer(rating_judge("judge-a", 2), port=port) as a_again:  # back to the first: its answers are kept
        assert cli(*args, "--judge-base-url", a_again.url) is None
        assert a_again.state.answered == a_again.state.stats().get("probes", 0) == 1
    assert result(run, "mt_bench")["headline"] == 2.0


# ---- issue 23 item 8: resume state is not taken on trust ------------------------------------------------

def test_a_key_stored_twice_with_two_texts_is_refused_naming_file_and_rows(tmp_path):
    path = tmp_path / "generations.jsonl"
    SampleStore(path, {"max_new_tokens": 8}).append({"a#0": "first", "b#0": "second"})
    lines = path.read_text().splitlines()
    poisoned = json.loads(lines[0]) | {"text": "poisoned"}
    path.write_text("\n".join([*lines, json.dumps(poisoned)]) + "\n")
    with pytest.raises(RecordError, match=rf"{path}: row 3: key 'a#0' is stored twice with different texts \(rows 1 and 3\)"):
        SampleStore(path, {"max_new_tokens": 8}).texts()


def test_rows_without_their_settings_file_are_refused(tmp_path):
    path = tmp_path / "generations.jsonl"
    SampleStore(path, {"max_new_tokens": 512}).append({"a#0": "made with 512 new tokens"})
    path.with_suffix(".meta.json").unlink()
    with pytest.raises(RecordError, match=r"has samples but no generations.meta.json saying how they were made; pass --rerun"):
        SampleStore(path, {"max_new_tokens": 8})


def test_rows_made_with_other_settings_are_refused_even_under_a_matching_settings_file(tmp_path):
    old, path = tmp_path / "old.jsonl", tmp_path / "generations.jsonl"
    SampleStore(old, {"max_new_tokens": 512}).append({"a#0": "long"})
    SampleStore(path, {"max_new_tokens": 8}).append({"b#0": "short"})
    path.write_text(path.read_text() + old.read_text())  # a row copied in from another run
    with pytest.raises(RecordError, match=r"generations.jsonl: row 2: made with other settings"):
        SampleStore(path, {"max_new_tokens": 8}).texts()


def test_a_cached_judge_failure_is_asked_again_never_averaged(tmp_path, judge_server):
    answers, run = mt_answers(tmp_path, 2), tmp_path / "run"
    args = ["mt-bench", "judge", "--run-dir", str(run), "--answers", str(answers), "--limit", "2",
            "--judge-base-url", judge_server.url]
    assert cli(*args) is None
    honest = result(run, "mt_bench")
    with sqlite3.connect(run / "judge_cache.sqlite") as db:  # every stored answer becomes a failure rated [[10]]
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            if "reply" in [c[1] for c in db.execute(f"PRAGMA table_info({table})")]:
                db.execute(f"UPDATE {table} SET reply = ?", (json.dumps({"text": "Rating: [[10]]", "error": "HTTP 500"}),))
    answered = judge_server.state.answered
    assert cli(*args) is None
    again = result(run, "mt_bench")
    assert again["headline"] == honest["headline"] and again["metrics"]["n_judge_failures"] == 0
    assert judge_server.state.answered - answered == 4 + judge_server.state.stats().get("probes", 0)  # all asked again
