"""The SFT driver's progress lines, from rank 0's metrics.jsonl (no Ray, no model)."""

from __future__ import annotations

import json

from train.sft import follow_steps


def test_driver_prints_the_steps_the_workers_write(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"event": "step", "step": 9, "loss": 9.0}) + "\n")  # old run
    lines: list[str] = []
    with follow_steps(path, total=4, log=lines.append, poll_s=60):
        with path.open("a") as f:  # what rank 0 appends while fit() runs
            f.write(json.dumps({"event": "data", "records": 3}) + "\n")
            for step in (1, 2, 3, 4):
                f.write(json.dumps({"event": "step", "step": step, "loss": 3.0 - step / 4,
                                    "tokens_per_s": 410.6}) + "\n")
    # the old run's step is not reported; the last step always is, with its figures
    assert all("9/4" not in line for line in lines)
    assert lines[-1].startswith("sft: step 4/4 · loss 2.000 · tokens/s 411")
