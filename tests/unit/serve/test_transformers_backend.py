"""The transformers backend on a tiny random-weight Llama (built here, no Ray, no download).

The tokenizer is the embedded SmolLM2's (prepared by ``teams-rl models prepare``); the
weights are random, so greedy outputs are arbitrary but deterministic: a batch must give
exactly what each request gives alone.
"""

from __future__ import annotations

import threading

import pytest

from rl_system.config import EMBEDDED_LLM
from serve.protocol import BackendError, ChatMessage, GenerationRequest, ScoreRequest

CONTEXT = 256  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from serve.models import ModelNotFoundError, resolve_model

    try:
        tokenizer_dir = resolve_model(EMBEDDED_LLM, prepare=False)
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.3,  # peaked logits: greedy choices far from ties
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    from serve.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(tiny_model_dir, device="cpu", torch_threads=1)
    b.load()
    return b


def _chat(text: str, max_tokens: int = 6) -> GenerationRequest:
    return GenerationRequest(
        messages=[ChatMessage(role="user", content=text)], temperature=0.0, max_tokens=max_tokens
    )


PROMPTS = [
    "Hi.",
    "Write a long and careful explanation of why the sky looks blue at noon and red at dusk.",
    "Name one prime.",
    "List three rivers of Europe, then say which is the longest and how long it is.",
]


def test_batch_of_different_lengths_matches_one_by_one(backend):
    alone = [backend.generate([_chat(p)])[0].text for p in PROMPTS]
    batched = [c.text for c in backend.generate([_chat(p) for p in PROMPTS])]
    assert batched == alone


def test_concurrent_batches_keep_left_padding(backend):
    """Generate and log-prob batches run in threads at once, as a replica's batches do."""
    requests = [_chat(p) for p in PROMPTS]
    expected = [backend.generate([r])[0].text for r in requests]
    expected_lp = [backend.token_logprobs([p])[0].logprobs for p in PROMPTS]
    padding_side = backend._tokenizer.padding_side
    wrong: list = []

    def gen():
        for _ in range(10):
            got = [c.text for c in backend.generate(requests)]
            if got != expected:
                wrong.append(got)

    def logprobs():
        for _ in range(10):
            got = [lp.logprobs for lp in backend.token_logprobs(PROMPTS)]
            pairs = zip(got, expected_lp, strict=True)
            if any(g[1:] != pytest.approx(e[1:], abs=1e-4) for g, e in pairs):
                wrong.append(got)

    threads = [threading.Thread(target=f) for f in (gen, logprobs, gen, logprobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
    # padding is chosen per call: the tokenizer the batches share is never changed
    assert backend._tokenizer.padding_side == padding_side


def test_over_long_request_fails_alone(backend):
    long = _chat("word " * CONTEXT)
    results = backend.generate([_chat(PROMPTS[0]), long, _chat(PROMPTS[2])])
    assert isinstance(results[1], BackendError) and not results[1].transient
    assert "tokens" in str(results[1])
    assert [results[0].text, results[2].text] == [
        backend.generate([_chat(PROMPTS[0])])[0].text, backend.generate([_chat(PROMPTS[2])])[0].text
    ]


def test_prompt_and_max_tokens_beyond_the_context_fail_alone(backend):
    ok, too_much = _chat("Hi."), _chat("Hi.", max_tokens=CONTEXT)
    results = backend.generate([ok, too_much])
    assert results[0].text == backend.generate([ok])[0].text
    assert isinstance(results[1], BackendError) and not results[1].transient


def test_max_prompt_tokens_is_enforced_per_request(tiny_model_dir):
    from serve.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(tiny_model_dir, device="cpu", max_prompt_tokens=40)
    b.load()
    short, long = _chat("Hi."), _chat("many words " * 30)
    results = b.generate([short, long])
    assert results[0].text
    assert isinstance(results[1], BackendError) and not results[1].transient
    assert "max_prompt_tokens 40" in str(results[1])
    [scored] = b.score([ScoreRequest(messages=long.messages, candidates=["yes"])])
    assert isinstance(scored, BackendError) and "max_prompt_tokens 40" in str(scored)


def test_empty_candidate_fails_only_its_request(backend):
    good = ScoreRequest(messages=[ChatMessage(role="user", content="Is 7 prime?")],
                        candidates=["Yes", "No"])
    bad = ScoreRequest(messages=good.messages, candidates=["Yes", ""])
    alone = backend.score([good])[0].logprobs
    results = backend.score([good, bad, good])
    assert isinstance(results[1], BackendError) and not results[1].transient
    assert results[0].logprobs == pytest.approx(alone, abs=1e-4)
    assert results[2].logprobs == pytest.approx(alone, abs=1e-4)


def test_health_check_runs_the_model(tiny_model_dir):
    import torch

    from serve.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(tiny_model_dir, device="cpu")
    b.load()
    b.check_health()
    with torch.no_grad():
        b._model.model.embed_tokens.weight.fill_(float("nan"))  # a corrupted model
    with pytest.raises(BackendError, match="health"):
        b.check_health()


def test_score_equals_the_full_forward_log_probs_of_each_candidate(backend):
    """Projecting only the positions that predict a candidate changes nothing: the sums
    match a plain forward over the whole row, for candidates of different lengths, in a
    batch with prompts of other lengths."""
    import torch

    requests = [
        ScoreRequest(messages=[{"role": "user", "content": "Equal or not? <<<a>>> <<<b>>>"}],
                     candidates=["Equal", "Not Equal"]),
        ScoreRequest(messages=[{"role": "user", "content": "Rate it from 1 to 5, a longer "
                                "prompt than the first one by several words."}],
                     candidates=["1", "2", "3", "4", "5"]),
    ]
    got = [r.logprobs for r in backend.score(requests)]
    for request, values in zip(requests, got, strict=True):
        prompt = backend._encode(backend._render(request))
        for candidate, value in zip(request.candidates, values, strict=True):
            ids = prompt + backend._encode(candidate)
            with torch.inference_mode():
                logits = backend._model(input_ids=torch.tensor([ids])).logits.float()
            logp = torch.log_softmax(logits[0], dim=-1)
            expected = sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt), len(ids)))
            assert value == pytest.approx(expected, abs=1e-4)
