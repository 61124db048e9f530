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
