"""``LLMServer``'s batching without Ray: the replica class driven on a plain event loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve.deployment import LLMServer, LLMServerSpec
from serve.protocol import BackendError, ChatMessage, GenerationRequest, ScoreRequest


@pytest.fixture(scope="module")
def run():
    """One event loop for the module: like a replica's, ``@serve.batch``'s queues (one per
    decorated method, not per instance) live on the loop that first used them."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


@pytest.fixture(scope="module", autouse=True)
def replica_context():
    """The context Serve gives a replica (``@serve.batch`` reads its deployment config)."""
    from ray.serve import context
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve._private.config import DeploymentConfig
    from ray.serve.schema import ReplicaRank

    context._set_internal_replica_context(
        replica_id=ReplicaID("unit", DeploymentID(name="test", app_name="unit")),
        servable_object=None, _deployment_config=DeploymentConfig(max_ongoing_requests=64),
        rank=ReplicaRank(rank=0, node_rank=0, local_rank=0), world_size=1,
    )
    yield
    context._INTERNAL_REPLICA_CONTEXT = None


def _server(script: dict, **spec) -> LLMServer:
    return LLMServer(LLMServerSpec(
        deployment_name="test", backend="scripted",
        backend_kwargs={"model": "scripted", "script": script}, **spec,
    ))


def _ask(text: str) -> GenerationRequest:
    return GenerationRequest(messages=[ChatMessage(role="user", content=text)], max_tokens=8)


def test_a_rejected_request_fails_alone_in_its_batch(run):
    async def main():
        server = _server({"reject_when_contains": "BOOM", "default": "ok {last_user}"})
        return await asyncio.gather(
            server.generate(_ask("one")), server.generate(_ask("BOOM two")),
            server.generate(_ask("three")),
            server.score(ScoreRequest(messages=[ChatMessage(role="user", content="BOOM")],
                                      candidates=["a"])),
            return_exceptions=True,
        )

    first, bad, third, bad_score = run(main())
    assert (first.text, third.text) == ("ok one", "ok three")
    for err in (bad, bad_score):
        assert isinstance(err, BackendError) and not err.transient, err


def test_a_cancelled_request_stops_its_batch_for_the_next_one(run):
    latency_s = 2.0

    async def main():
        server = _server({"latency_s": latency_s})
        started = time.monotonic()
        gone = asyncio.create_task(server.generate(_ask("never read")))
        await asyncio.sleep(0.3)
        gone.cancel()  # what Serve does when the caller cancels or times out
        with pytest.raises(asyncio.CancelledError):
            await gone
        await server.generate(_ask("next"))  # queued behind the cancelled batch
        return time.monotonic() - started

    elapsed = run(main())
    # the next batch starts once the cancelled one stops, not after its full latency
    assert elapsed < 0.3 + latency_s + 0.9, elapsed
