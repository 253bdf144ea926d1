"""The official `openai` client, sync and async, against the live server."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.e2e.conftest import API_KEY, MODEL, LiveServer

pytestmark = pytest.mark.model

MESSAGES = [{"role": "user", "content": "Name three colours."}]
PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


def prompt_tokens(server: LiveServer, messages: list[dict] | None = None, prompt: str | None = None) -> int:
    tok = server.engine.tokenizer
    text = prompt if prompt is not None else tok.apply_chat_template(messages or MESSAGES)
    return len(tok.encode(text))


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat(client: openai.OpenAI, server: LiveServer) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0
    )
    r = raw.parse()
    assert raw.headers["x-request-id"] == r.id and r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion" and r.model == MODEL
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens == prompt_tokens(server)
    assert 1 <= u.completion_tokens <= 12 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 <= u.prompt_tokens_details.cached_tokens <= u.prompt_tokens


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_completions_length_and_usage(client: openai.OpenAI, server: LiveServer) -> None:
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens == prompt_tokens(server, prompt=PROMPT)
    streamed = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=7,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    assert streamed[-1].usage.completion_tokens == 7


def test_batch_prompts_and_token_ids(client: openai.OpenAI, server: LiveServer) -> None:
    ids = server.engine.tokenizer.encode(PROMPT)
    r = client.completions.create(model=MODEL, prompt=[PROMPT, "Water boils at"], max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text


def test_n_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=6,
        n=3,
        temperature=1.0,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    assert len({c.message.content for c in r.choices}) > 1  # seeds seed, seed+1, seed+2 differ
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=5,
            n=2,
            temperature=1.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_string(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 12, "temperature": 0}
    free = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert stop.strip(), free
    r = client.completions.create(**kw, stop=[stop, "never appears"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == free[: free.index(stop)]
    s = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stop=" ")
    assert " " not in s.choices[0].message.content and s.choices[0].finish_reason == "stop"


def test_seed_reproducible(client: openai.OpenAI) -> None:
    kw = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 10,
        "temperature": 1.0,
        "extra_body": {"ignore_eos": True},
    }
    a = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    others = {client.chat.completions.create(**kw, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert a == b and others - {a}


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob)  # greedy takes the most likely
        assert t.bytes == list(t.token.encode())
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)


def test_completion_logprobs_streamed(client: openai.OpenAI) -> None:
    kw = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": 2,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.completions.create(**kw)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == whole.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(len(top) == 2 for top in lp.top_logprobs)
    streamed = [
        c.choices[0].logprobs for c in client.completions.create(**kw, stream=True) if c.choices[0].logprobs
    ]
    assert [t for s in streamed for t in s.tokens] == lp.tokens


def test_request_id_header(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="Hi", max_tokens=2, extra_headers={"X-Request-ID": "my-id-42"}
    )
    assert raw.headers["x-request-id"] == "my-id-42" and raw.parse().id == "my-id-42"


def test_timeout_extension(client: openai.OpenAI) -> None:
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000}
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**kw, extra_body={"timeout": 0.3, "ignore_eos": True})
    assert e.value.status_code == 504 and e.value.body["code"] == "deadline_exceeded"
    with pytest.raises(openai.APIError, match="deadline exceeded"):
        for _ in client.completions.create(
            **kw, stream=True, extra_body={"timeout": 0.3, "ignore_eos": True}
        ):
            pass


def test_async_client_chat_and_completions(server: LiveServer) -> None:
    async def main() -> None:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=60)
        chat = await aclient.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0
        )
        assert chat.choices[0].message.content
        stream = await aclient.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [c async for c in stream]
        assert chunks[-1].usage.completion_tokens == 5
        cstream = await aclient.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in cstream])
        assert text
        await aclient.close()

    asyncio.run(main())
