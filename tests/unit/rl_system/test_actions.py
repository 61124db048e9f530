from rl_system.actions import ACTION_NAMES, ACTIONS, STOP, action_by_name, depth_and_breadth


def test_catalogue_holds_the_six_operations_and_stop():
    assert set(ACTION_NAMES) == {
        "add_constraints", "deepening", "concretizing", "increase_reasoning_steps",
        "complicate_input", "breadth", "stop",
    }
    assert ACTIONS[STOP].name == "stop" and not ACTIONS[STOP].queries_model
    assert len(depth_and_breadth()) == 6


def test_each_request_carries_the_instruction_and_its_own_change():
    instruction = "Explain photosynthesis to a child."
    texts = [a.messages(instruction)[0]["content"] for a in depth_and_breadth()]
    assert all(f"<<<{instruction}>>>" in t for t in texts)
    assert len(set(texts)) == len(texts)  # every action asks for something different
    assert all(a.change in t for a, t in zip(depth_and_breadth(), texts, strict=True))


def test_unknown_action_lists_known_names():
    try:
        action_by_name("summarise")
    except KeyError as exc:
        assert "add_constraints" in str(exc)
    else:
        raise AssertionError("expected KeyError")


def test_the_request_shows_the_input_and_only_breadth_replaces_the_task():
    memo = "Memo: the launch moved from May 3 to May 17; QA needs two more weeks."
    replacing = [a.name for a in ACTIONS if a.replaces_task]
    assert replacing == ["breadth"]  # a property of the entry, not a name check elsewhere
    for action in depth_and_breadth():
        text = action.messages("Summarise the memo.", memo)[0]["content"]
        assert "<<<Summarise the memo.>>>" in text and text.endswith(memo)
        assert action.input_after(memo) == ("" if action.replaces_task else memo)
        assert ("without any input" in text) == action.replaces_task
    # no input, no input section
    plain = action_by_name("deepening").messages("Summarise the memo.")[0]["content"]
    assert plain.endswith("<<<Summarise the memo.>>>")


def test_one_decoding_of_policy_outputs():
    import gymnasium as gym
    import numpy as np

    from rl_system.actions import action_space, decode_action

    box = action_space("continuous")
    # Unbounded: RLlib's env runner neither squashes nor clips it (no ties at the bound).
    assert isinstance(box, gym.spaces.Box) and box.shape == (len(ACTIONS),)
    assert not box.bounded_above.any() and not box.bounded_below.any()
    scores = np.array([3.0, 1.5, 2.0, -1.0, 0.0, 1.1, 4.0])
    assert decode_action(scores, "continuous") == 6
    assert action_space("discrete") == gym.spaces.Discrete(len(ACTIONS))
    assert decode_action(np.int64(3), "discrete") == 3 and decode_action(2, "discrete") == 2
