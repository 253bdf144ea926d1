"""Every bad input gets its status and an OpenAI error body, and the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.e2e.conftest import API_KEY, MODEL, LiveServer

pytestmark = pytest.mark.model

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def check_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": MODEL}, "messages"),
        ("/v1/chat/completions", {"messages": CHAT["messages"]}, "model"),
        ("/v1/chat/completions", {**CHAT, "messages": "Hi"}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": "many"}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
        ("/v1/chat/completions", {**CHAT, "n": 17}, "n"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": -5}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
        ("/v1/chat/completions", {**CHAT, "temperature": 2.5}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "top_p": 0}, "top_p"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "presence_penalty": 0.5}, "presence_penalty"),
        ("/v1/chat/completions", {**CHAT, "min_tokens": 5}, "min_tokens"),
        ("/v1/chat/completions", {**CHAT, "stop": [""]}, "stop"),
        ("/v1/chat/completions", {**CHAT, "timeout": -1}, "timeout"),
        ("/v1/chat/completions", {**CHAT, "timeout": 1e308}, "timeout"),
        ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": [1, "a"]}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": [10**9]}, "prompt"),
        ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {**COMPLETION, "echo": True}, "echo"),
    ],
)
def test_bad_fields_are_400(http: httpx.Client, path: str, body: dict, param: str) -> None:
    r = http.post(path, json=body)
    check_error(r, 400)
    assert r.json()["error"]["param"].split(".")[0] == param


def test_invalid_json_is_400(http: httpx.Client) -> None:
    check_error(http.post("/v1/chat/completions", content=b'{"model": '), 400, "invalid_json")
    check_error(http.post("/v1/completions", content=b"\xff\xfe"), 400, "invalid_json")
    check_error(http.post("/v1/completions", json=[1, 2]), 400, "invalid_json")


def test_unknown_model_is_404(http: httpx.Client) -> None:
    check_error(
        http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"}), 404, "model_not_found", "model"
    )
    check_error(http.get(f"/v1/models/{MODEL}-nope"), 404, "model_not_found")
    check_error(http.get("/v1/no-such-route"), 404)


def test_prompt_longer_than_the_context_is_400_with_counts(http: httpx.Client, server: LiveServer) -> None:
    prompt = "hello world " * 5000
    n = len(server.engine.tokenizer.encode(prompt))
    ctx = server.engine.max_model_len
    assert n > ctx
    msg = check_error(
        http.post("/v1/completions", json={**COMPLETION, "prompt": prompt}),
        400,
        "context_length_exceeded",
        "prompt",
    )
    assert f"{ctx} tokens" in msg and f"{n} in the prompt" in msg
    chat = {**CHAT, "max_tokens": ctx}
    msg = check_error(
        http.post("/v1/chat/completions", json=chat), 400, "context_length_exceeded", "messages"
    )
    assert f"{ctx} in the completion" in msg
    messages = [{"role": "user", "content": prompt}]
    check_error(
        http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages}),
        400,
        "context_length_exceeded",
    )


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    big = json.dumps({**COMPLETION, "prompt": "x" * (2 << 20)}).encode()
    check_error(http.post("/v1/completions", content=big), 413, "request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        for i in range(0, len(big), 1 << 16):
            yield big[i : i + (1 << 16)]

    check_error(http.post("/v1/completions", content=chunked()), 413, "request_too_large")


def test_api_key(server: LiveServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(server.base_url + "/chat/completions", json=CHAT, headers=headers)
        check_error(r, 401, "invalid_api_key")
        check_error(httpx.get(server.base_url + "/models", headers=headers), 401)
    assert httpx.get(server.url + "/health").status_code == 200  # liveness needs no key
    assert httpx.get(server.url + "/ready").status_code == 200


def test_openai_client_raises_the_matching_errors(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT["messages"], n=20)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Hi")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="bad", max_retries=0).models.list()


def test_still_serving_after_bad_input(http: httpx.Client, server: LiveServer) -> None:
    r = http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    assert server.in_flight == 0
