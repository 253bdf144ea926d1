"""Nothing on the serve path imports what serving does not use: the test and lint tools of the dev
extra (not installed by `make serve`), the bench's plotting, FastAPI (the gateway's: the server is a
Starlette app, and FastAPI's import alone was ~0.25 s of a start) and pydantic.v1, and PyTorch: the fused
step's path is a C library and numpy, so a start from the caches does not import torch (~1 s of a 1.6 s
start, issue 23; tests/e2e/test_serve_process.py checks a real start), and numpy not before the socket
is bound. Checked in a fresh interpreter, so other tests' imports cannot hide one."""

from __future__ import annotations

import json
import subprocess
import sys

# Every module `tailserve serve` imports: the listener's, then the loader thread's (server/cli.py).
LISTENER = ("tailserve.cli", "tailserve.server.cli", "tailserve.server.loading", "tailserve.server.shutdown",
            "uvicorn")  # fmt: skip
LOADER = ("tailserve.engine.async_engine", "tailserve.engine.load", "tailserve.obs.observer",
          "tailserve.server.app", "tailserve.models.meta_cache")  # fmt: skip
NOT_FOR_SERVING = ("transformers", "accelerate", "hypothesis", "openai", "pytest", "ruff", "jsonschema",
                   "matplotlib", "rich", "fastapi", "pydantic.v1", "torch")  # fmt: skip

PROBE = """
import importlib, json, sys
listener, loader = json.loads(sys.argv[1])
for name in listener:
    importlib.import_module(name)
heavy_before_listening = [m for m in ("torch", "fastapi", "numpy") if m in sys.modules]
for name in loader:
    importlib.import_module(name)
print(json.dumps({"before": heavy_before_listening, "all": sorted({m.split(".")[0] for m in sys.modules}),
                  "modules": sorted(sys.modules)}))
"""


def test_serve_path_imports_only_what_serving_uses() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([LISTENER, LOADER])],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    seen = json.loads(out.splitlines()[-1])
    assert seen["before"] == [], f"imported before the socket is bound: {seen['before']}"
    assert "numpy" in seen["all"]  # the probe did reach the loader's imports
    leaked = sorted(set(NOT_FOR_SERVING) & (set(seen["all"]) | set(seen["modules"])))
    assert leaked == [], f"the serve path imports {leaked}"
