"""Engine and server configuration: plain dataclasses; CLI flags map onto them one to one."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

DEFAULT_MODEL = "smollm2-135m-instruct"


def model_name(model: str) -> str:
    """The name a model is served under: a default model's name, or the file/folder name (here, not in
    models/loader.py, so the server can name its model before importing torch)."""
    return Path(model).expanduser().name.removesuffix(".gguf")


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    block_size: int = 16
    kv_cache_memory: float = 1.0  # GiB for the KV block pool
    max_num_seqs: int = 64
    # Per-step token budget (decodes + prefill chunks). Small: a step of 128 prompt tokens takes ~0.1 s
    # here, so requests arriving together get first tokens in turn rather than all after one long
    # step, and running streams' ITL stays bounded; prefill is compute-bound from ~32 rows on, so
    # larger chunks would buy no throughput (BENCHMARKS.md).
    max_num_batched_tokens: int = 128
    max_model_len: int | None = None  # defaults to the model's context length, capped by the pool
    chunked_prefill: bool = True
    prefix_cache: bool = True
    length_aware: bool = True  # short prompts ahead of long ones; long ones keep a floor of the budget
    long_prefill_threshold: int | None = None  # tokens left to prefill above which a prompt is long
    # (default: half the budget, at least 256)
    priority_aging: float = 2.0  # seconds of waiting that count as one priority level
    quantization: str = "auto"  # auto | none | int8 | int4 (auto: the checkpoint's own, on the fused step)
    fused: bool = True  # the whole step in one C++ call on the CPU (every tier: layers/kernels.py; bf16)
    weight_cache: bool = True  # keep the fused step's packed weights on disk: the next start is fast
    speculative: str = "off"  # off | ngram | draft (spec_decode.py)
    num_speculative_tokens: int = 4  # most tokens a request guesses per step
    # For draft: "layers:N", the target's own first N layers (default: a quarter of them), or a model
    # (name or path) that shares the target's tokenizer, run with a KV pool of its own.
    draft_model: str | None = None
    spec_adaptive: bool = True  # guess only what pays for itself (acceptance and step cost); off: always k
    seed: int = 0
    grammar_timeout: float = 10.0  # seconds a JSON schema may take to compile before its request gets 400
    num_threads: int | None = None  # torch intra-op threads; None = torch's default


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queue: int = 256  # waiting requests beyond which new ones get 429
    max_queue_tokens: int = 1 << 20  # queued prompt tokens beyond which new ones get 429
    max_queue_wait: float | None = None  # seconds; shed a request predicted to wait longer
    request_timeout: float | None = None  # seconds; abort requests running longer
    max_body_bytes: int = 4 << 20
    shutdown_grace: float = 30.0
    # Deltas a stream may hold for a client reading slower than the engine writes (one a step, ~8 s at
    # 30 steps/s), beyond what the sockets buffer; a client further behind has its request aborted.
    stream_buffer: int = 256
    access_log: bool = False  # a log line per request costs the event loop time
    metrics: bool = True  # GET /metrics (Prometheus)
    otel_exporter: str | None = None  # console | otlp: OpenTelemetry spans per request; off when unset
    request_log: bool = True  # a JSON line per finished request on stderr, written off the hot path
    log_prompts: bool = False  # put the prompt (or messages) in those lines
    stall_share: float = 0.0  # fault injection (server/faults.py): share of requests held before the engine
    stall_seconds: float = 0.0  # for that long; benchmarks of hedging use it, serving never should


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field (`max_num_seqs` → `--max-num-seqs`); booleans get `--x/--no-x`."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        default = f.default
        if kind == "bool":
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction)
        elif kind.startswith("int"):
            parser.add_argument(flag, type=int, default=default)
        elif kind.startswith("float"):
            parser.add_argument(flag, type=float, default=default)
        else:
            parser.add_argument(flag, default=default)


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
