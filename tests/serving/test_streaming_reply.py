"""What a patient sees of a reply, with FakeEngine and a scripted scorer: streams count every attempt's tokens."""
from __future__ import annotations

import pytest

from tests.serving.test_chat import REPLIES, chat, collect, make, settle  # noqa: F401 (make: fixture)


# ---------------------------------------------------------------- true usage
@pytest.mark.asyncio
async def test_streams_count_the_tokens_of_every_attempt(make):
    svc = make(engine_kw={"token_delay": 0.001})
    svc.engine.replies["warm"] = "UNSAFE from the start. " + " ".join(["more"] * 20) + "."
    chunks, text = await collect(await chat(svc, preference="warm", stream=True,
                                             stream_options={"include_usage": True}))
    assert text == REPLIES["safe"] and chunks[-2]["attune"]["gate"] == "regenerated"
    await settle(svc)
    first, second = (svc.engine.usage(q.request_id) for q in svc.engine.requests)
    assert first.finish_reason == "abort" and first.completion_tokens > 0 and second.finish_reason == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == first.completion_tokens + second.completion_tokens
    assert chunks[-1]["usage"]["prompt_tokens"] == first.prompt_tokens + second.prompt_tokens > 0
