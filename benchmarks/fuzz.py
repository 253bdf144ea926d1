"""API fuzzing, long form: schemathesis cases generated from `GET /openapi.json` of `tailserve serve`
(with a 2 s --request-timeout, so a generated request for thousands of tokens ends) and of the gateway
in front of it; every answer is checked as tests/e2e/fuzz_checks.py says (no 5xx but a request's own
504 deadline, the OpenAI error shape, streams ended by [DONE]); an answer slower than 30 s is a hang.

    flock /work/bench.lock .venv/bin/python benchmarks/fuzz.py [--examples 200]
"""

from __future__ import annotations

import argparse
import json
import sys

from harness import RECORDED, ROOT, header
from reliability import server_and_gateway, settled

sys.path.insert(0, str(ROOT))
from tests.e2e.fuzz_checks import fuzz


def summarize(url: str, examples: int) -> dict:
    statuses, failures = fuzz(url, examples)
    return {
        "cases": sum(statuses.values()),
        "statuses": dict(statuses),
        "failures": failures[:20],
        "n_failures": len(failures),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=200, help="generated cases per operation")
    args = ap.parse_args()
    with server_and_gateway("--request-timeout", "2") as (server, gateway):
        summary = {
            name: summarize(p.url, args.examples) for name, p in (("server", server), ("gateway", gateway))
        }
        summary["idle_gauges_after"] = settled(server)
    (RECORDED / "fuzz.json").write_text(json.dumps(summary, indent=2))
    print(header("API fuzzing", f"python benchmarks/fuzz.py --examples {args.examples}"))
    print(json.dumps(summary))
    cases = summary["server"]["cases"] + summary["gateway"]["cases"]
    bad = summary["server"]["n_failures"] + summary["gateway"]["n_failures"]
    print(f"fuzz: {'PASS' if not bad else 'FAIL'} — {cases} cases, {bad} failures")


if __name__ == "__main__":
    main()
