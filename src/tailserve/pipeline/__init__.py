"""tailserve.pipeline: an application's request as a DAG of stages under one end-to-end budget.

`Budget` (budget.py) is the deadline; `Stage` and its overrun policies (stage.py) say what each step
may spend and what answers when it cannot; `Pipeline` (dag.py) runs independent stages concurrently;
`LLMClient` (llm.py) passes the time left to the server as `timeout`; `tools.run_loop` runs the
model's parallel tool calls; caches (cache.py), prompt layout (layout.py), validated compression
(compress.py, compressor.py) and observability (record.py, report.py, metrics.py, tracing.py).
"""

from tailserve.pipeline.budget import Budget, allowance
from tailserve.pipeline.cache import TTLCache, normalise
from tailserve.pipeline.dag import Pipeline
from tailserve.pipeline.llm import ChatResult, LLMClient, LLMError
from tailserve.pipeline.stage import (
    DeadlineExceeded,
    Degrade,
    Skip,
    Stage,
    StageContext,
    UseCached,
    UseDefault,
)
from tailserve.pipeline.tools import ToolSpec, run_loop

__all__ = [
    "Budget",
    "ChatResult",
    "DeadlineExceeded",
    "Degrade",
    "LLMClient",
    "LLMError",
    "Pipeline",
    "Skip",
    "Stage",
    "StageContext",
    "TTLCache",
    "ToolSpec",
    "UseCached",
    "UseDefault",
    "allowance",
    "normalise",
    "run_loop",
]
