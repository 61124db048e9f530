"""SFT on Ray Train with the embedded SmolLM2-135M: sharding, learning, failure, export.

One FSDP run (2 CPU workers, 10 steps, one injected worker failure) is shared by the
slow tests; they read what it logged to ``runs/<name>/sft/metrics.jsonl``. On this tiny
fixed dataset the loss falls by an order of magnitude within a few steps, so 10 steps
show learning while keeping the file to a few minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rl_system.config import ConfigError, SFTConfig, TeamsRLConfig
from rl_system.placement import InsufficientResources
from train.data import SFTDataError
from train.recipe import FAIL_ONCE_MARKER, lr_at
from train.sft import plan_steps, run_sft

FACTS = [
    ("capital of France", "Paris"), ("capital of Japan", "Tokyo"),
    ("capital of Italy", "Rome"), ("capital of Egypt", "Cairo"),
    ("capital of Peru", "Lima"), ("capital of Kenya", "Nairobi"),
    ("capital of Norway", "Oslo"), ("capital of Chile", "Santiago"),
    ("largest ocean", "the Pacific"), ("longest river", "the Nile"),
    ("closest star", "the Sun"), ("red planet", "Mars"),
    ("freezing point of water in Celsius", "0 degrees"), ("number of legs of a spider", "8"),
    ("author of Hamlet", "Shakespeare"), ("metal that is liquid at room temperature", "mercury"),
]
MAX_STEPS = 10
CHECKPOINT_EVERY = 5
FAIL_AT = 7  # two steps after the step-5 checkpoint


def write_records(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """Rows with the DESIGN §3 dataset-record schema."""
    rows = [
        {
            "id": f"rec-{i:03d}",
            "seed_id": f"seed-{i:03d}",
            "seed_instruction": f"Tell me the {topic}.",
            "instruction": f"What is the {topic}? Answer in one short sentence.",
            "response": f"FACT: the {topic} is {answer}.",
            "actions": ["deepening"],
            "evolution_step": 1,
            "review": {"info_gain": 0.5, "eliminated": False},
            "expert_model": "embedded:smollm2-135m-instruct",
            "expert_queries": 2,
            "expert_tokens": 40,
            "strategy": "policy",
            "policy_checkpoint": "none",
        }
        for i, (topic, answer) in enumerate(pairs)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def make_cfg(run_dir: Path, **sft) -> TeamsRLConfig:
    defaults = {
        "num_workers": 2,
        "strategy": "fsdp",
        "max_seq_len": 64,
        "batch_size_per_worker": 1,
        "max_steps": MAX_STEPS,
        "learning_rate": 1e-4,
        "warmup_ratio": 0.1,
        "eval_fraction": 0.125,
        "eval_every_steps": CHECKPOINT_EVERY,
        "checkpoint_every_steps": CHECKPOINT_EVERY,
        "keep_checkpoints": 2,
        "max_failures": 1,
    }
    return TeamsRLConfig.model_validate(
        {"run": {"name": "sft-test", "dir": str(run_dir)}, "sft": {**defaults, **sft}}
    )


def events(stage: Path, kind: str | None = None, *, first_run: bool = False) -> list[dict]:
    """Logged events; ``first_run`` stops at the first export (later re-runs append more)."""
    out = []
    for line in (stage / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if kind is None or record["event"] == kind:
            out.append(record)
        if first_run and record["event"] == "export":
            break
    return out


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    data = write_records(root / "data" / "records.parquet", FACTS)
    cfg = make_cfg(root / "runs", fail_once_at_step=FAIL_AT)
    started = time.monotonic()
    final = run_sft(cfg, dataset_path=data)
    return {"cfg": cfg, "data": data, "final": final, "stage": cfg.stage_dir("sft"),
            "seconds": time.monotonic() - started}


@pytest.mark.slow
def test_fsdp_gives_each_worker_half_of_the_model(trained):
    start = events(trained["stage"], "start", first_run=True)[0]
    total = start["param_numel"]
    assert start["world_size"] == 2 and start["strategy"] == "fsdp"
    assert sum(start["local_param_numel"]) == total
    for held in start["local_param_numel"]:
        assert abs(held - total / 2) < 0.01 * total

    # Parameters, gradients and AdamW's two moments, all fp32 and sharded: 16 bytes per
    # parameter over two ranks -> about 8 each (measured from the local shards).
    memory = events(trained["stage"], "memory", first_run=True)[0]
    for state_bytes in memory["model_state_bytes"]:
        assert state_bytes == pytest.approx(8 * total, rel=0.02)


@pytest.mark.slow
def test_training_loss_falls(trained):
    steps = {e["step"]: e for e in events(trained["stage"], "step", first_run=True)}
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))
    first = sum(steps[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(steps[s]["loss"] for s in range(MAX_STEPS - 2, MAX_STEPS + 1)) / 3
    assert last < 0.2 * first, (first, last)
    assert all(steps[s]["tokens_per_s"] > 0 for s in steps)
    evals = {e["step"]: e["eval_loss"] for e in events(trained["stage"], "eval", first_run=True)}
    assert sorted(evals) == [0, CHECKPOINT_EVERY, MAX_STEPS]  # base model, then every K steps
    assert evals[MAX_STEPS] < 0.5 * evals[0], evals


@pytest.mark.slow
def test_failed_worker_resumes_from_its_checkpoint(trained):
    stage = trained["stage"]
    assert json.loads((stage / FAIL_ONCE_MARKER).read_text())["step"] == FAIL_AT
    starts = events(stage, "start", first_run=True)
    assert [s["start_step"] for s in starts] == [0, CHECKPOINT_EVERY]
    assert starts[1]["resumed_from"].endswith(f"step_{CHECKPOINT_EVERY:06d}")

    # Steps logged after the restart pick up right after the checkpoint, not at 1.
    log = events(stage, first_run=True)
    restart = log.index(starts[1])
    after = [e["step"] for e in log[restart:] if e["event"] == "step"]
    assert after == list(range(CHECKPOINT_EVERY + 1, MAX_STEPS + 1))
    before = [e["step"] for e in log[:restart] if e["event"] == "step"]
    assert before == list(range(1, FAIL_AT + 1))
    assert json.loads((trained["final"] / "teams_rl_sft.json").read_text())["step"] >= MAX_STEPS


EXPORT_CHECK = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    final, base, instruction, response = sys.argv[1:]
    tok = AutoTokenizer.from_pretrained(final)
    prompt = tok.apply_chat_template([{"role": "user", "content": instruction}],
                                     add_generation_prompt=True, tokenize=False)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    full = tok(prompt + response, return_tensors="pt", add_special_tokens=False)
    labels = full.input_ids.clone()
    labels[:, : enc.input_ids.shape[1]] = -100
    out = {}
    for name, path in (("final", final), ("base", base)):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            out[f"loss_{name}"] = model(**full, labels=labels).loss.item()
            if name == "final":
                gen = model.generate(**enc, max_new_tokens=16, do_sample=False)
                out["text"] = tok.decode(gen[0, enc.input_ids.shape[1]:],
                                         skip_special_tokens=True)
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_export_loads_in_a_fresh_process_and_generates(trained):
    from serve.models import resolve_model

    final = trained["final"]
    assert final == trained["stage"].resolve() / "final"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    topic, answer = FACTS[0]
    proc = subprocess.run(
        [sys.executable, "-c", EXPORT_CHECK, str(final),
         resolve_model(trained["cfg"].sft.base_model),
         f"What is the {topic}? Answer in one short sentence.",
         f"FACT: the {topic} is {answer}."],
        capture_output=True, text=True, timeout=300,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["text"].strip()
    # The export is the fine-tuned model: it finds a trained answer far likelier than the base.
    assert result["loss_final"] < 0.5 * result["loss_base"], result


@pytest.mark.slow
def test_the_serving_layer_serves_the_export(trained, serve_port):
    from ray import serve

    from rl_system.config import load_config
    from serve.app import build_app
    from serve.client import LLMClient

    final = str(trained["final"])
    cfg = load_config(None, [
        f"serve.port={serve_port}", "serve.app_name=sft-export", f"models.expert.model={final}",
        "models.expert.sampling.max_tokens=12",
    ])
    cfg.models.instructor = cfg.models.reviewer = cfg.models.expert
    serve.run(build_app(cfg), name="sft-export", route_prefix="/sft-export")
    try:
        client = LLMClient.from_config(cfg, "expert", transport="handle")
        [completion] = client.generate(["Say something about the sea."])
        assert completion.text.strip() and completion.model == final
        assert len(client.score("Name a colour.", ["Blue", "Seven"])) == 2
    finally:
        serve.delete("sft-export")


@pytest.mark.slow
def test_rerun_reuses_a_finished_run_and_continues_a_longer_one(trained):
    stage, data = trained["stage"], trained["data"]
    logged = len(events(stage))
    started = time.monotonic()
    assert run_sft(trained["cfg"], dataset_path=data) == trained["final"]
    assert time.monotonic() - started < 30
    assert len(events(stage)) == logged  # nothing trained again

    longer = make_cfg(Path(trained["cfg"].run.dir), max_steps=MAX_STEPS + 1,
                      fail_once_at_step=FAIL_AT)
    run_sft(longer, dataset_path=data)
    new = events(stage)[logged:]
    assert [e["start_step"] for e in new if e["event"] == "start"] == [MAX_STEPS]
    assert [e["step"] for e in new if e["event"] == "step"] == [MAX_STEPS + 1]
    marker = json.loads((trained["final"] / "teams_rl_sft.json").read_text())
    assert marker["step"] == MAX_STEPS + 1


# -- refused before training ------------------------------------------------------------


def test_missing_column_is_refused_before_training(ray_session, tmp_path):
    bad = tmp_path / "data" / "no-response.parquet"
    bad.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([{"instruction": "Hi?", "answer": "Hello."}]), bad)
    cfg = make_cfg(tmp_path / "runs")

    with pytest.raises(SFTDataError, match=r"no-response\.parquet has no 'response' column"):
        run_sft(cfg, dataset_path=bad.parent)
    assert not cfg.stage_dir("sft").exists()


def test_empty_dataset_is_refused_before_training(ray_session, tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"instruction": pa.array([], pa.string()),
                             "response": pa.array([], pa.string())}), empty)
    cfg = make_cfg(tmp_path / "runs")

    with pytest.raises(SFTDataError, match="has no rows"):
        run_sft(cfg, dataset_path=empty)
    assert not cfg.stage_dir("sft").exists()


def test_more_workers_than_the_cluster_holds_is_refused(ray_session, tmp_path):
    data = write_records(tmp_path / "records.parquet", FACTS[:4])
    cpus = int(ray_session.cluster_resources()["CPU"])
    cfg = make_cfg(tmp_path / "runs", num_workers=cpus + 1)
    with pytest.raises(InsufficientResources,
                       match=rf"sft.num_workers={cpus + 1}.* has {cpus} CPU"):
        run_sft(cfg, dataset_path=data)

    gpus = int(ray_session.cluster_resources().get("GPU", 0))
    cfg = make_cfg(tmp_path / "runs", num_workers=gpus + 1, use_gpu=True)
    with pytest.raises(InsufficientResources, match=rf"has {gpus} GPU.*sft.use_gpu=false"):
        run_sft(cfg, dataset_path=data)
    assert not cfg.stage_dir("sft").exists()


def test_too_little_data_for_one_step_is_refused():
    sft = SFTConfig(num_workers=2, batch_size_per_worker=4, gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="= 16; lower one of them or add data"):
        plan_steps(sft, train_rows=15)
    assert plan_steps(sft, train_rows=33) == (2, 2, 1)


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, peak=1.0, warmup_steps=4, total_steps=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert 0 < lrs[-1] < 0.02
