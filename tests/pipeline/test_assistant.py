"""The example assistant (examples/assistant) over HTTP against the fake LLM server: the answer
streams, the model's tool calls run, the budget travels as `timeout`, and a stalling tool backend
costs a tool message, not the deadline."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx

from tests.gateway.conftest import serve
from tests.pipeline.conftest import FakeLLM, Reply, call

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from assistant.app import Assistant, AssistantConfig, build_app
from assistant.tools import ToolLatency

from tailserve.pipeline import LLMClient

QUESTION = [{"role": "user", "content": "How long do refunds take for order TO-12345?"}]


def ask(server: FakeLLM, cfg: AssistantConfig, stream: bool = True) -> tuple[str, dict, float]:
    llm = LLMClient(server.url, "m")
    assistant = Assistant(cfg, llm, llm.with_model("small"))
    with serve(build_app(assistant)) as url:
        body = {"model": "assistant", "messages": QUESTION, "stream": stream, "max_tokens": 16, "user": "C-1"}
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        wall = time.perf_counter() - t0
        assert r.status_code == 200
        if not stream:
            data = r.json()
            return data["choices"][0]["message"]["content"], data["pipeline"], wall
        events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data: {")]
        text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
        report = next(e["pipeline"] for e in events if "pipeline" in e)
        assert httpx.get(url + "/report").json()["requests"] == 1
        metrics = httpx.get(url + "/metrics").text
        assert "tailserve:pipeline_stage_seconds_bucket" in metrics
        assert 'tailserve:pipeline_cache_misses_total{cache="retrieval"} 1.0' in metrics
        return text, report, wall


def test_the_assistant_answers_with_tools_under_its_budget(llm_server: FakeLLM) -> None:
    llm_server.reset(
        [
            Reply(
                tool_calls=[
                    call("load_policy", 0, topic="refunds"),
                    call("shipping_status", 1, order_id="TO-12345"),
                ]
            )
        ],
        default=Reply(content="Refunds take 5 business days."),
    )
    cfg = AssistantConfig(llm_url=llm_server.url, slo_s=5.0, compression="off")
    text, report, _ = ask(llm_server, cfg)
    assert text.split() == ["Refunds", "take", "5", "business", "days."]
    assert [s["stage"] for s in report["stages"]][-2:] == ["tools", "answer"]
    assert all(s["outcome"] == "ok" for s in report["stages"]) and not report["degraded"]
    assert sorted(report["tool_calls"]) == [["load_policy", "ok"], ["shipping_status", "ok"]]
    tools_req, answer_req = llm_server.requests
    # the tools stage's share (3 of the 3 + 4 weights left on its path), then all that is left
    assert tools_req["tool_choice"] == "required" and 0 < tools_req["timeout"] <= 5.0 * 3 / 7
    assert answer_req["stream"] and tools_req["timeout"] < answer_req["timeout"] < 5.0
    system = tools_req["messages"][0]["content"]
    assert system.startswith("You are the support assistant") and "Refund policy" in system  # retrieved
    assert [m["role"] for m in answer_req["messages"]][-2:] == ["tool", "tool"]


def test_a_stalling_tool_costs_a_tool_message_not_the_deadline(llm_server: FakeLLM) -> None:
    llm_server.reset(
        [Reply(tool_calls=[call("shipping_status", 0, order_id="TO-1")])], default=Reply(content="ok")
    )
    stall = ToolLatency(stall_share=1.0, stall_s=30.0)
    cfg = AssistantConfig(
        llm_url=llm_server.url, slo_s=3.0, compression="off", tool_timeout_s=0.3, latency=stall
    )
    text, report, wall = ask(llm_server, cfg, stream=False)
    assert text.strip() == "ok" and wall < 3.0
    assert report["tool_calls"] == [["shipping_status", "timeout"]]
    assert report["stages"][0]["outcome"] == "cached" or any(s["outcome"] != "ok" for s in report["stages"])
    assert "did not answer" in llm_server.requests[1]["messages"][-1]["content"]
