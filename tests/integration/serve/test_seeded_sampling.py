"""``GenerationRequest.seed`` on the transformers backend: a seeded request samples the
same completion again, alone or batched with others (stage 2's exact resume relies on it
now that the expert samples as configured)."""

from __future__ import annotations

import pytest

from rl_system.config import EMBEDDED_LLM
from serve.protocol import GenerationRequest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backend():
    from serve.backends.transformers_backend import TransformersBackend

    b = TransformersBackend(EMBEDDED_LLM, device="cpu")
    b.load()
    return b


def _req(text, seed):
    return GenerationRequest(messages=[{"role": "user", "content": text}], temperature=1.0,
                             top_p=0.95, max_tokens=16, seed=seed)


def test_a_seeded_request_samples_the_same_completion_alone_or_batched(backend):
    poem = "Write a short poem about the sea."
    alone = backend.generate([_req(poem, 7)])[0].text
    assert backend.generate([_req(poem, 7)])[0].text == alone
    batched = backend.generate([_req("Name three rivers in Africa and their lengths.", 3),
                                _req(poem, 7), _req("Hi", 5)])
    assert batched[1].text == alone
    others = {backend.generate([_req(poem, s)])[0].text for s in (8, 9, 10)}
    assert len(others | {alone}) > 1  # it does sample: other seeds, other poems
