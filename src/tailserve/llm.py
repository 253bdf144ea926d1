"""The offline Python front: `LLM(model).generate(prompts, params)` and `LLM.chat(messages, params)`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from tailserve.config import DEFAULT_MODEL, EngineConfig
from tailserve.engine.engine import LLMEngine
from tailserve.engine.outputs import RequestOutput, RequestTimes, TokenLogprob
from tailserve.sampling import SamplingParams

Prompt = str | list[int]
Messages = list[dict[str, Any]]


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    times: RequestTimes | None = None


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **engine_options: Any) -> None:
        self.engine = LLMEngine.from_config(EngineConfig(model=model, **engine_options))
        self._next_id = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Completion]:
        """Run every prompt to completion, batched together; results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        # Validate every request before queueing any, so a bad one leaves nothing half-started.
        seqs = [self.engine.make_sequence(self._new_id(), p, replace(sp)) for p, sp in zip(prompts, plist)]
        results = {s.request_id: Completion(s.request_id, list(s.prompt_token_ids)) for s in seqs}
        for s in seqs:
            self.engine.add_sequence(s)
        for out in self._drain():
            if out.request_id in results:
                _merge(results[out.request_id], out)
        return [results[s.request_id] for s in seqs]

    def chat(
        self, messages: Messages | list[Messages], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Completion]:
        """Apply the model's chat template to each conversation, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in convs]
        return self.generate(prompts, params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield one request's deltas as the engine produces them (for the CLI)."""
        seq = self.engine.add_request(self._new_id(), prompt, params or SamplingParams())
        try:
            for out in self._drain():
                if out.request_id == seq.request_id:
                    yield out
        finally:
            self.engine.abort(seq.request_id)

    def _drain(self) -> Iterator[RequestOutput]:
        while self.engine.has_unfinished():
            yield from self.engine.step()

    def _new_id(self) -> str:
        self._next_id += 1
        return f"offline-{self._next_id}"


def _merge(c: Completion, out: RequestOutput) -> None:
    c.token_ids.extend(out.new_token_ids)
    c.text += out.new_text
    c.num_cached_tokens = out.num_cached_tokens
    c.times = out.times
    if out.logprobs is not None:
        c.logprobs = (c.logprobs or []) + out.logprobs
    if out.finished:
        c.finish_reason, c.error = out.finish_reason, out.error
