"""What happened to each stage of one request: the plain data spans, metrics and the "where the time
went" report are all built from, after the request (nothing on the request path but appends)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Stage outcomes. "ok" ran within its allowance; the others say which policy answered instead.
OUTCOMES = ("ok", "skipped", "default", "cached", "degraded")


@dataclass
class StageRecord:
    name: str
    allowance_s: float  # what the stage was given when it started
    start: float  # clock time (the budget's clock)
    end: float
    outcome: str  # one of OUTCOMES
    overrun: bool  # the stage hit its allowance (or had too little to start)
    # why the stage itself did not answer: "timeout" (its allowance), "deadline" (a call it made was
    # shed or cut for lack of time), "no_time" (too little left to start) or the exception
    error: str | None = None
    notes: tuple[str, ...] = ()  # degrades the stage chose itself while answering (fewer tokens, small tier)

    @property
    def elapsed_s(self) -> float:
        return self.end - self.start


@dataclass
class RequestRecord:
    """One request through the pipeline. `stages` in the order they finished."""

    budget_s: float
    start: float
    end: float = 0.0
    stages: list[StageRecord] = field(default_factory=list)

    @property
    def e2e_s(self) -> float:
        return self.end - self.start

    @property
    def degraded(self) -> bool:
        """Any stage answered by its policy rather than by itself, or degraded itself."""
        return any(s.outcome != "ok" or s.notes for s in self.stages)
