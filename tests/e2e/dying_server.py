"""`python -m tests.e2e.dying_server PORT`: `tailserve serve`'s serving loop over a tiny model whose
scheduler breaks when a request whose id starts with "kill" arrives: the engine thread dies then. Each
step takes at least 10 ms, so a long stream is still running when that happens."""

from __future__ import annotations

import logging
import sys
import time

import torch

from tailserve.config import ServerConfig
from tailserve.engine.async_engine import AsyncEngine
from tailserve.server.cli import serve
from tests.tiny import tiny_engine


def main(port: int) -> int:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    engine = tiny_engine()
    schedule = engine.scheduler.schedule

    def breaking_schedule():
        if any(rid.startswith("kill") for rid in engine.requests):
            raise RuntimeError("scheduler state corrupt")
        time.sleep(0.01)
        return schedule()

    engine.scheduler.schedule = breaking_schedule
    return serve(AsyncEngine(engine), ServerConfig(port=port, request_log=False), "tiny")


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
