"""Engine and server configuration: plain dataclasses; CLI flags map onto them one to one."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    block_size: int = 16
    kv_cache_memory: float = 1.0  # GiB for the KV block pool
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # per-step token budget (decodes + prefill chunks)
    max_model_len: int | None = None  # defaults to the model's context length, capped by the pool
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    quantization: str = "none"
    seed: int = 0
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
