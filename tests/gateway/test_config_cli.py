"""Config errors name the key; the CLI refuses a bad file before serving and serves `--backend` models."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tailserve.gateway.config import ConfigError, load_config, parse_config
from tests.gateway.conftest import Fake, fakes


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"models": {"a": {"backends": [{"url": "http://x", "weight": 0}]}}}, "models.a.backends[0].weight"),
        (
            {"models": {"a": {"backends": [{"url": "http://x"}], "fallback": ["b"]}}},
            "models.a.fallback[0]: no model",
        ),
        ({"models": {"a": {"backends": [{}]}}}, "models.a.backends[0]: give exactly one of 'url' or 'spawn'"),
        ({"models": {"a": {"backends": [{"url": "x"}]}}}, "url must start with http"),
        ({"models": {"a": {"backends": [{"url": "http://x", "wieght": 1}]}}}, "models.a.backends[0].wieght"),
        (
            {"models": {"a": {"backends": [{"spawn": {"replicas": 0}}]}}},
            "models.a.backends[0].spawn.replicas",
        ),
        ({"models": {}}, "models"),
        (
            {"models": {"a": {"backends": [{"url": "http://x"}]}}, "retry": {"max_attempts": 0}},
            "retry.max_attempts",
        ),
        ([1, 2], "the top level must be a mapping"),
        (
            {"models": {"a": {"backends": [{"url": "http://x"}]}}, "cpus": [0, 4096]},
            "cpus[1]: CPU 4096 is not one this process may run on",
        ),
    ],
)
def test_bad_config_names_the_key(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(data, "g.yaml")


def test_good_config_loads(tmp_path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(
        "deadline: 30\nmodels:\n  chat:\n    backends:\n"
        "      - url: http://127.0.0.1:1/v1\n        weight: 2\n"
        "      - spawn: {replicas: 2, args: [--max-num-seqs, '8']}\n    fallback: [small]\n"
        "  small:\n    backends: [{url: 'http://127.0.0.1:2'}]\n"
    )
    config = load_config(path)
    assert config.deadline == 30 and config.models["chat"].backends[1].spawn.replicas == 2  # type: ignore[union-attr]
    path.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def _gateway_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tailserve.cli", "gateway", *args]


def test_cli_refuses_a_bad_config_before_serving(tmp_path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("models:\n  a:\n    backends: [{url: 'http://x', max_concurrency: 0}]\n")
    done = subprocess.run(_gateway_cmd("--config", str(path)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "models.a.backends[0].max_concurrency" in done.stderr


def test_cli_serves_the_models_its_backends_list() -> None:
    with fakes(Fake(model="alpha"), Fake(model="beta")) as fs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cpu = max(os.sched_getaffinity(0))
        args = ["--port", str(port), "--cpus", str(cpu)] + [a for f in fs for a in ("--backend", f.url)]
        proc = subprocess.Popen(
            _gateway_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ
        )
        try:
            url = f"http://127.0.0.1:{port}"
            end = time.monotonic() + 30
            while True:
                assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
                try:
                    if httpx.get(url + "/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < end
                time.sleep(0.1)
            assert sorted(m["id"] for m in httpx.get(url + "/v1/models").json()["data"]) == ["alpha", "beta"]
            assert os.sched_getaffinity(proc.pid) == {cpu}  # --cpus pinned the serving thread
            r = httpx.post(
                url + "/v1/chat/completions",
                json={"model": "beta", "messages": [{"role": "user", "content": "x"}]},
            )
            assert r.status_code == 200 and len(fs[1].requests) == 1 and not fs[0].requests
        finally:
            proc.terminate()
            proc.wait(timeout=15)


@pytest.mark.model
def test_cli_spawns_its_tailserve_backends_and_stops_them(tmp_path) -> None:
    from tests.e2e.conftest import ENGINE_FLAGS

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_FLAGS.items()]
    path = tmp_path / "g.yaml"
    path.write_text(
        json.dumps({"models": {"chat": {"backends": [{"spawn": {"replicas": 1, "args": flags}}]}}})
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(_gateway_cmd("--config", str(path), "--port", str(port)), stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < end
            time.sleep(0.2)
        gw_metrics = httpx.get(url + "/metrics").text
        backends = {
            line.split('backend="')[1].split('"')[0]
            for line in gw_metrics.splitlines()
            if "gateway_in_flight{" in line
        }
        assert len(backends) == 1
        r = httpx.post(
            url + "/v1/completions", json={"model": "chat", "prompt": "Hello", "max_tokens": 4}, timeout=60
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    for b in backends:  # stopped with the gateway
        with pytest.raises(httpx.ConnectError):
            httpx.get(b.removesuffix("/v1") + "/health", timeout=2)


def test_spawn_entries_expand_to_replicas_answering_to_the_public_name() -> None:
    from tailserve.gateway.pools import resolve_urls

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[list[str]] = []

        def start(self, args: list[str], cpus: list[int] | None = None) -> str:
            self.calls.append(args)
            return f"http://127.0.0.1:{9000 + len(self.calls)}"

    config = parse_config(
        {
            "models": {
                "chat": {"backends": [{"spawn": {"replicas": 3, "args": ["--max-num-seqs", "8"]}}]},
                "named": {"backends": [{"spawn": {"args": ["--served-model-name", "x"]}, "model": "x"}]},
            }
        }
    )
    rec = Recorder()
    urls = resolve_urls(config, rec)  # type: ignore[arg-type]
    assert [kind for _, kind in urls["chat", 0]] == ["tailserve"] * 3
    assert len({u for u, _ in urls["chat", 0]}) == 3
    assert rec.calls[0] == ["--max-num-seqs", "8", "--served-model-name", "chat"]
    assert rec.calls[3] == ["--served-model-name", "x"]  # the name it was given is kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_spawned_process_dies_with_its_parent() -> None:
    """A spawned backend outlives no gateway, even one killed by SIGKILL (no cleanup runs)."""
    code = (
        "import sys, time; from tailserve.gateway.spawn import Spawned; s = Spawned(); "
        "s.start(['--max-num-seqs', '2']); print(s.procs[0][1].pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())  # type: ignore[union-attr]
    parent.kill()
    parent.wait(timeout=10)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, 9)
    pytest.fail("the spawned child outlived its parent")


def test_cpu_shares_split_the_cpus_into_disjoint_slices() -> None:
    from tailserve.gateway.spawn import cpu_shares

    assert cpu_shares([0, 1], 1) == [[0, 1]]
    assert cpu_shares([0, 1], 2) == [[0], [1]]
    assert cpu_shares(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert cpu_shares([4, 6, 8], 3) == [[4], [6], [8]]
    assert cpu_shares([0, 1], 3) == [[0], [1], [0]]  # more replicas than CPUs: one each, in turn


def test_spawned_replicas_get_cpus_of_their_own_unless_they_set_their_threads(monkeypatch) -> None:
    """Replicas left to their default thread count are held to disjoint CPU shares (outside the
    gateway's own `cpus`); one given `--num-threads` is the user's to place and is not pinned."""
    from tailserve.gateway import pools

    class Recorder:
        def __init__(self) -> None:
            self.cpus: list[list[int] | None] = []

        def start(self, args: list[str], cpus: list[int] | None = None) -> str:
            self.cpus.append(cpus)
            return f"http://127.0.0.1:{9000 + len(self.cpus)}"

    monkeypatch.setattr(pools, "usable_cpus", lambda: {0, 1, 2, 3, 4})
    config = parse_config(
        {
            "models": {
                "a": {"backends": [{"spawn": {"replicas": 2}}]},
                "b": {"backends": [{"spawn": {"args": ["--num-threads", "3"]}}, {"spawn": {}}]},
            }
        }
    )
    rec = Recorder()
    pools.resolve_urls(config, rec)  # type: ignore[arg-type]
    assert rec.cpus == [[0, 1], [2, 3], None, [4]]

    config.cpus = [0]  # the gateway's own core is left to it
    rec = Recorder()
    pools.resolve_urls(config, rec)  # type: ignore[arg-type]
    assert rec.cpus == [[1, 2], [3], None, [4]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sched_setaffinity is Linux's")
def test_a_spawned_child_runs_on_its_share_alone() -> None:
    from tailserve.gateway.spawn import _child_setup

    cpu = max(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
        preexec_fn=_child_setup([cpu]),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip() == f"[{cpu}]"


def test_a_backend_still_starting_is_waited_for_and_a_broken_one_is_not() -> None:
    from tailserve.gateway.cli import config_from_backends

    with fakes(Fake(model="alpha", starting=3)) as (f,):
        with pytest.raises(ConfigError, match="503"):
            config_from_backends([f.url])  # no wait: the 503 is final
        assert config_from_backends([f.url], wait=30)["models"]["alpha"]["backends"][0]["url"] == f.url
    with fakes(Fake(model="alpha")) as (f,):
        start = time.monotonic()
        with pytest.raises(ConfigError, match="404"):
            config_from_backends([f.url + "/nowhere"], wait=30)  # not starting: wrong, and said at once
        assert time.monotonic() - start < 5
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ConfigError, match="cannot list its models"):
        config_from_backends([f"http://127.0.0.1:{port}"], wait=1.0)
    assert 1.0 <= time.monotonic() - start < 10
