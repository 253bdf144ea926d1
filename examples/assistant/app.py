"""A chat assistant built on tailserve.pipeline, served over HTTP as an OpenAI-compatible endpoint
(so `tailserve bench --workload pipeline --url ...` drives it like any server).

One request, under one budget (`--slo`):

    retrieve (BM25, fan-out k; degrade: smaller k) ─┐
    profile  (profile service; overrun: cached)    ─┼─▶ tools (the model's parallel calls) ─▶ answer
    compress (older turns; validated, or fallback) ─┘                                        (streamed)

Every LLM call carries the time left as `timeout`; every tool call is capped by it. The answer trims
its max_tokens to what the measured decode speed fits in the time left, and moves to the small tier
when too little fits. `GET /report` is "where the time went" over the requests so far (POST
/report/reset clears it), `GET /metrics` the pipeline's Prometheus metrics.

Run: python examples/assistant/app.py --llm-url http://127.0.0.1:8000 --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make `assistant` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from assistant.store import Store
from assistant.tools import Backends, ToolLatency, tool_specs
from tailserve.pipeline import (
    Budget,
    Degrade,
    LLMClient,
    Pipeline,
    Skip,
    Stage,
    StageContext,
    TTLCache,
    UseCached,
    UseDefault,
    normalise,
    run_loop,
)
from tailserve.pipeline import compress as compression
from tailserve.pipeline.budget import fit_tokens
from tailserve.pipeline.compressor import CompressionConfig, Compressor
from tailserve.pipeline.layout import StableCheck, layout
from tailserve.pipeline.llm import ChatResult
from tailserve.pipeline.metrics import PipelineMetrics
from tailserve.pipeline.rates import RateReader
from tailserve.pipeline.report import RunReport, request_report
from tailserve.pipeline.tools import LoopResult
from tailserve.pipeline.tracing import PipelineTracing

SYSTEM = (
    "You are the support assistant of Trailhead Outfitters, an outdoor gear shop. Answer the customer's "
    "question briefly and only from the documents, the profile and the tool results."
)
UNAVAILABLE = "Sorry, I cannot answer that in time right now. Please try again in a moment."


@dataclass(frozen=True)
class AssistantConfig:
    llm_url: str = "http://127.0.0.1:8000"
    model: str = ""  # default: the server's first model
    small_model: str = ""  # the small tier (default: the same model)
    slo_s: float = 8.0  # the end-to-end budget of one request
    budgets: bool = True  # off: no allowances, no tool timeouts, no `timeout` sent
    parallel_tools: bool = True
    caches: bool = True
    compression: str = "auto"  # off | auto | on
    compress_min_tokens: int = 1024
    keep_last: int = 4
    fan_out: int = 6
    degraded_fan_out: int = 2
    fetch_latency_s: float = 0.02  # per retrieval, simulated fetch of the article bodies
    tool_timeout_s: float = 1.0
    tool_rounds: int = 1
    tool_choice: str = "required"  # the first round's: the model must pick its calls
    tool_max_tokens: int = 96
    min_answer_tokens: int = 24  # below this many fitting tokens, the small tier answers
    # the prior split of retrieve, profile, compress, tools, answer
    weights: tuple[float, float, float, float, float] = (1, 1, 1, 3, 4)
    learn_rate: float = 0.2  # split by the stages' measured typical times once known (0: by weights only)
    latency: ToolLatency = field(default_factory=ToolLatency)
    seed: int = 0


def _unbounded() -> float:
    """The time left when budgets are off: an hour for every call."""
    return 3600.0


def last_user(messages: list[dict[str, Any]]) -> str:
    return next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")


class Assistant:
    def __init__(self, cfg: AssistantConfig, llm: LLMClient, small: LLMClient) -> None:
        self.cfg = cfg
        self.llm, self.small = llm, small
        self.store = Store(fetch_latency_s=cfg.fetch_latency_s)
        ttl = 300.0
        self.retrieval_cache = TTLCache("retrieval", 1024, ttl) if cfg.caches else None
        self.policy_cache = TTLCache("policy", 256, ttl) if cfg.caches else None
        self.profile_cache = TTLCache("profile", 4096, ttl)  # the overrun answer: kept either way
        summary_cache = TTLCache("summary", 256, ttl) if cfg.caches else None
        self.backends = Backends(self.store, cfg.latency, self.policy_cache, cfg.seed)
        self.tools = tool_specs(self.backends, cfg.tool_timeout_s if cfg.budgets else 3600.0)
        self.compressor = Compressor(
            small,
            CompressionConfig(cfg.compression, cfg.compress_min_tokens, cfg.keep_last),
            summary_cache,
        )
        self.rates = RateReader(cfg.llm_url, llm.http)
        self.stable = StableCheck()
        caches = [
            c
            for c in (self.retrieval_cache, self.policy_cache, self.profile_cache, summary_cache)
            if c is not None
        ]
        self.metrics = PipelineMetrics(caches, self.compressor.stats, self.stable)
        self.report = RunReport()
        self.tracing: PipelineTracing | None = None
        w = cfg.weights
        self.pipeline = Pipeline(
            [
                Stage("retrieve", self._retrieve, weight=w[0],
                      on_overrun=Degrade(self._retrieve_small, grace_s=0.2)),
                Stage("profile", self._profile, weight=w[1],
                      on_overrun=UseCached(self.profile_cache, key=lambda i: i["user"], default={})),
                Stage("compress", self._compress, weight=w[2],
                      on_overrun=Degrade(self._fallback_history, grace_s=0.05)),
                Stage("tools", self._tools, after=("retrieve", "profile", "compress"), weight=w[3],
                      on_overrun=Skip()),
                Stage("answer", self._answer, after=("tools",), weight=w[4],
                      on_overrun=UseDefault(None)),
            ],
            learn_rate=cfg.learn_rate or None,
        )  # fmt: skip

    # --- stages -------------------------------------------------------------------------------------

    async def _search(self, question: str, k: int) -> list[str]:
        async def fetch() -> list[str]:
            return [f"{d.title}: {d.text}" for d in await self.store.search(question, k)]

        if self.retrieval_cache is None:
            return await fetch()
        return await self.retrieval_cache.get_or_compute((normalise(question), k), fetch)

    async def _retrieve(self, ctx: StageContext) -> list[str]:
        return await self._search(ctx.inputs["question"], self.cfg.fan_out)

    async def _retrieve_small(self, ctx: StageContext) -> list[str]:
        return await self._search(ctx.inputs["question"], self.cfg.degraded_fan_out)

    async def _profile(self, ctx: StageContext) -> dict[str, Any]:
        return await self.backends.profile(ctx.inputs["user"])

    async def _compress(self, ctx: StageContext) -> list[dict[str, Any]]:
        msgs = ctx.inputs["messages"]
        if self.cfg.compression == "off":
            return msgs
        out = await self.compressor.run(msgs, await self.rates.get(), ctx.remaining)
        if out.used != "none":
            ctx.notes.append(f"compress:{out.used}")
        return out.messages

    async def _fallback_history(self, ctx: StageContext) -> list[dict[str, Any]]:
        return compression.fallback(ctx.inputs["messages"], self.cfg.keep_last)

    def _prompt(self, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        profile = inputs.get("profile") or {}
        system = SYSTEM + (
            f"\nCustomer id: {inputs['user']}. Profile: {json.dumps(profile)}" if profile else ""
        )
        history = inputs.get("compress") or inputs["messages"]
        lay = layout(system, inputs.get("retrieve") or [], history, [t.schema() for t in self.tools])
        self.stable.observe(inputs["user"], lay.stable_key)
        return lay.messages

    async def _tools(self, ctx: StageContext) -> LoopResult:
        return await run_loop(
            self.llm,
            self._prompt(dict(ctx.inputs)),
            self.tools,
            ctx.remaining if self.cfg.budgets else _unbounded,
            self.cfg.tool_rounds,
            parallel=self.cfg.parallel_tools,
            first_choice=self.cfg.tool_choice,
            headers=ctx.inputs["headers"],
            max_tokens=self.cfg.tool_max_tokens,
            temperature=0.0,
        )

    async def _answer(self, ctx: StageContext) -> ChatResult:
        inputs = dict(ctx.inputs)
        loop: LoopResult | None = inputs.get("tools")
        messages = loop.messages if loop is not None else self._prompt(inputs)
        out: asyncio.Queue[str | None] = inputs["out"]
        llm, wanted = self.llm, int(inputs["max_tokens"])
        params = {k: inputs[k] for k in ("temperature", "ignore_eos") if inputs.get(k) is not None}
        left = ctx.remaining() if self.cfg.budgets else 3600.0
        if self.cfg.budgets:
            rates = await self.rates.get()
            prompt = sum(compression.approx_tokens(str(m.get("content") or "")) for m in messages)
            first = prompt / rates.prefill_tokens_per_s if rates.prefill_tokens_per_s else 0.0
            fit = fit_tokens(left, first, rates.s_per_output_token, wanted)
            if fit < min(wanted, self.cfg.min_answer_tokens):
                llm = self.small
                ctx.notes.append("small_tier")
                fit = max(1, fit)
            elif fit < wanted:
                ctx.notes.append("fewer_tokens")
            wanted = fit
        result = ChatResult()
        headers = inputs["headers"]
        async for piece in llm.stream(messages, left, result, headers, max_tokens=wanted, **params):
            out.put_nowait(piece)
        return result

    # --- one request --------------------------------------------------------------------------------

    async def handle(self, body: dict[str, Any], out: asyncio.Queue[str | None]) -> dict[str, Any]:
        """Run the pipeline for one chat request, streaming the answer's pieces into `out` (None ends
        it). Returns the request's report (and its usage)."""
        cfg = self.cfg
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        user = str(body.get("user") or f"C-{zlib.crc32(json.dumps(messages[:2]).encode()) % 100000:05d}")
        budget = Budget(cfg.slo_s if cfg.budgets else 3600.0)
        inputs = {
            "messages": messages,
            "question": last_user(messages),
            "user": user,
            "out": out,
            "max_tokens": body.get("max_tokens") or body.get("max_completion_tokens") or 128,
            "temperature": body.get("temperature"),
            "ignore_eos": body.get("ignore_eos"),
        }
        span = self.tracing.start("pipeline") if self.tracing else None
        inputs["headers"] = PipelineTracing.headers(span) if span else None
        try:
            results, rec = await self.pipeline.run(budget, inputs)
        finally:
            out.put_nowait(None)
        if self.tracing and span:
            self.tracing.finish(span, rec)
        answer: ChatResult | None = results.get("answer")
        loop: LoopResult | None = results.get("tools")
        self.report.add(rec)
        self.metrics.observe(rec, loop.outcomes if loop else ())
        report = request_report(rec)
        report["tool_calls"] = [(o.name, o.status) for o in loop.outcomes] if loop else []
        report["usage"] = {
            "prompt_tokens": answer.prompt_tokens if answer else 0,
            "completion_tokens": answer.completion_tokens if answer else 0,
            "total_tokens": (answer.prompt_tokens + answer.completion_tokens) if answer else 0,
        }
        report["answered"] = answer is not None and bool(answer.content)
        return report


def _chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    ev = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(ev)}\n\n"


def build_app(assistant: Assistant, name: str = "assistant") -> Starlette:
    async def chat(request: Request) -> Response:
        body = await request.json()
        rid = "chatcmpl-" + uuid.uuid4().hex[:16]
        out: asyncio.Queue[str | None] = asyncio.Queue()
        task = asyncio.ensure_future(assistant.handle(body, out))
        if not body.get("stream"):
            report = await task
            pieces = []
            while (p := out.get_nowait()) is not None:
                pieces.append(p)
            text = "".join(pieces) or UNAVAILABLE
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            return JSONResponse(
                {"id": rid, "object": "chat.completion", "model": name, "choices": [choice],
                 "usage": report["usage"], "pipeline": report}
            )  # fmt: skip

        async def events() -> AsyncIterator[str]:
            sent = False
            try:
                while (piece := await out.get()) is not None:
                    sent = True
                    yield _chunk(rid, name, {"content": piece})
                report = await task
                if not sent:  # nothing answered in time: say so rather than stay silent
                    yield _chunk(rid, name, {"content": UNAVAILABLE})
                yield _chunk(rid, name, {}, "stop")
                tail = {"id": rid, "object": "chat.completion.chunk", "model": name, "choices": [],
                        "usage": report["usage"], "pipeline": report}  # fmt: skip
                yield f"data: {json.dumps(tail)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "example"}]}
        )

    async def report(request: Request) -> Response:
        if request.method == "POST":
            assistant.report.clear()
            return JSONResponse({"cleared": True})
        summary = assistant.report.summary()
        summary["tool_stalls"] = assistant.backends.stalls
        summary["tool_calls"] = dict(assistant.backends.calls)
        return JSONResponse(summary)

    async def metrics(request: Request) -> Response:
        return Response(assistant.metrics.render(), media_type="text/plain; version=0.0.4")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models),
            Route("/report", report, methods=["GET"]),
            Route("/report/reset", report, methods=["POST"]),
            Route("/metrics", metrics),
            Route("/health", health),
        ]
    )


def parse_args(argv: list[str] | None = None) -> tuple[AssistantConfig, str, int, str | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--otel-exporter", choices=("console", "otlp"), help="OpenTelemetry spans per stage")
    for f in fields(AssistantConfig):
        if f.name in ("latency", "weights"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(AssistantConfig(), f.name)
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda x: x.lower() in ("1", "on", "true", "yes"), default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    for f in fields(ToolLatency):
        p.add_argument("--" + f.name.replace("_", "-"), type=float, default=getattr(ToolLatency(), f.name))
    a = vars(p.parse_args(argv))
    latency = ToolLatency(**{f.name: a.pop(f.name) for f in fields(ToolLatency)})
    host, port, exporter = a.pop("host"), a.pop("port"), a.pop("otel_exporter")
    return AssistantConfig(**a, latency=latency), host, port, exporter


def make_assistant(cfg: AssistantConfig) -> Assistant:
    """The assistant against `cfg.llm_url`, the model found there when none is named."""
    model = cfg.model
    if not model:
        resp = httpx.get(cfg.llm_url.rstrip("/") + "/v1/models", timeout=30.0)
        resp.raise_for_status()
        model = resp.json()["data"][0]["id"]
    llm = LLMClient(cfg.llm_url, model)
    return Assistant(cfg, llm, llm.with_model(cfg.small_model or model))


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    cfg, host, port, exporter = parse_args(argv)
    assistant = make_assistant(cfg)
    if exporter:
        from tailserve.obs.tracing import make_tracer_provider

        assistant.tracing = PipelineTracing(make_tracer_provider(exporter))
    uvicorn.run(build_app(assistant), host=host, port=port, log_level="warning")


if __name__ == "__main__":
    main()
