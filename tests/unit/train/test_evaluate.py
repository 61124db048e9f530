"""Which lm-eval task index stage 4 builds: our own YAMLs alone when they hold every task."""

import pytest

pytest.importorskip("lm_eval")


def test_tasks_all_in_the_include_paths_do_not_index_lm_evals_own_catalogue():
    from train.evaluate import task_manager

    # lm-eval's own index of about 15,000 tasks took 60 s to build on a 2-core CPU; our
    # include path alone, 0.2 s.
    manager = task_manager(["data/eval"], ["teams_rl_mc"])
    assert manager.match_tasks(["teams_rl_mc"]) == ["teams_rl_mc"]
    assert not manager.match_tasks(["hellaswag"])


def test_a_task_outside_the_include_paths_falls_back_to_the_full_index(monkeypatch):
    import lm_eval.tasks

    from train.evaluate import task_manager

    real, built = lm_eval.tasks.TaskManager, []

    def recording(**kwargs):  # the full index is replaced: building it is the 60 s
        built.append(kwargs)
        return real(**kwargs) if kwargs.get("include_defaults") is False else "full index"

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", recording)
    assert task_manager(["data/eval"], ["teams_rl_mc", "hellaswag"]) == "full index"
    assert built == [{"include_path": ["data/eval"], "include_defaults": False},
                     {"include_path": ["data/eval"]}]
    built.clear()
    assert task_manager([], ["hellaswag"]) == "full index"
    assert built == [{"include_path": None}]
