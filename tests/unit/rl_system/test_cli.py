"""CLI bad-input paths: each fails with a clear message before any Ray work starts."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from rl_system.cli import main


def _run(calls: list, *args: str):
    result = CliRunner().invoke(main, list(args))
    assert calls == [], "failed input must not start Ray"
    return result


def test_malformed_seed_line_names_file_and_line(tmp_path, ray_init_calls):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "Name a bird."}\n{"instruction": "Name a fish."}\n{oops\n')
    result = _run(ray_init_calls, "train-policy", "--set", f"dataset.seeds={seeds}")
    assert result.exit_code == 1
    assert f"{seeds}:3" in result.output


def test_empty_seed_set_is_refused(tmp_path, ray_init_calls):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "   "}\n')
    result = _run(ray_init_calls, "train-policy", "--set", f"dataset.seeds={seeds}")
    assert result.exit_code == 1
    assert "no usable seed instructions" in result.output


def test_skip_bad_lines_counts_instead_of_failing(tmp_path):
    from rl_system.config import load_config
    from rl_system.policy import load_seed_instructions

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "Name a bird."}\nnot json\n{"instruction": ""}\n')
    cfg = load_config(None, [f"dataset.seeds={seeds}", "dataset.skip_bad_lines=true"])
    assert load_seed_instructions(cfg) == ["Name a bird."]


def test_invalid_override_names_the_field(ray_init_calls):
    result = _run(ray_init_calls, "train-policy", "--set", "policy.max_steps=0")
    assert result.exit_code == 1
    assert "policy.max_steps: Input should be greater than or equal to 1" in result.output


def test_unreachable_address_fails_fast_with_a_message():
    import time

    started = time.monotonic()
    result = CliRunner().invoke(main, ["train-policy", "--address", "127.0.0.1:9"])
    assert result.exit_code == 1
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in result.output
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("command", ["train-policy", "build-dataset", "sft", "pipeline"])
def test_unwritable_run_dir_fails_before_ray(tmp_path, ray_init_calls, command):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    result = _run(ray_init_calls, command, "--set", f"run.dir={blocker}",
                  "--set", "dataset.strategy=wizardlm")
    assert result.exit_code == 1
    assert "is not writable" in result.output and "run.dir" in result.output



def test_ray_datas_progress_bars_are_off_unless_verbose():
    from ray.data import DataContext

    from rl_system.cli import _quiet_ray_data

    before = DataContext.get_current().enable_progress_bars
    try:
        _quiet_ray_data(False)
        assert DataContext.get_current().enable_progress_bars is False
        _quiet_ray_data(True)
        assert DataContext.get_current().enable_progress_bars is True
    finally:
        DataContext.get_current().enable_progress_bars = before
