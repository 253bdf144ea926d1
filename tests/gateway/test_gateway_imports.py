"""The gateway runs no model: starting it must not import one's machinery. torch alone took 2 s of
its start (through the request checks it shares with the server, api/protocol.py)."""

from __future__ import annotations

import json
import subprocess
import sys

MODEL_MACHINERY = ("torch", "numpy", "transformers", "tokenizers", "gguf", "llguidance", "jinja2")

PROBE = """
import json, sys
import tailserve.gateway.cli, tailserve.gateway.app
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def test_the_gateway_imports_no_model_machinery() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = set(json.loads(out.stdout.splitlines()[-1]))
    assert "fastapi" in loaded  # the probe reached the app
    assert sorted(loaded & set(MODEL_MACHINERY)) == []
