"""The start's clock (obs/startup.py) and the download's progress line (models/download.py)."""

from __future__ import annotations

import io
import os

from prometheus_client import CollectorRegistry, generate_latest

from tailserve.models.download import ProgressLine, parse_progress
from tailserve.obs.startup import StartupTimer, process_age


def test_process_age_reads_proc_fields_after_the_command_name() -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    # A command name with spaces and a ')' must not shift the fields; starttime is field 22.
    fields = ["S", *["0"] * 18, str(50 * ticks)]
    stat = "123 (odd) name) " + " ".join(fields) + " 0 0"
    assert process_age(stat, "62.50 100.0") == 12.5
    assert process_age("garbage", "1.0 1.0") is None
    assert 0.0 <= (process_age() or 0.0) < 3600  # this process, read from /proc


def test_laps_accumulate_in_order_and_the_summary_names_them() -> None:
    timer = StartupTimer(started=0.0)  # a clock started "long ago": every lap is positive
    timer.lap("imports", next_phase="weights")
    assert timer.phase == "weights"
    timer.lap("weights")
    timer.lap("weights")
    assert list(timer.phases) == ["imports", "weights"]
    assert timer.ready_seconds is None
    assert "not ready after" in timer.summary()
    timer.listening()
    timer.ready()
    assert timer.phase == "ready"
    assert timer.ready_seconds is not None and timer.ready_seconds >= timer.listening_seconds  # type: ignore[operator]
    line = timer.summary()
    assert line.startswith("startup: ready in ") and "imports=" in line and "weights=" in line
    assert "\n" not in line


def test_skip_charges_no_phase() -> None:
    timer = StartupTimer(started=0.0)  # a clock started "long ago": every lap is positive
    timer.skip()
    timer.lap("tokenizer")
    assert timer.phases["tokenizer"] < 1.0  # only the time since skip(), not since the clock's start


def test_collector_exports_ready_and_every_phase() -> None:
    timer = StartupTimer()
    timer.lap("weights")
    reg = CollectorRegistry()
    reg.register(timer.collector("m"))
    before = generate_latest(reg).decode()
    assert "tailserve:startup_seconds{" not in before  # not ready yet: no total
    assert 'tailserve:startup_phase_seconds{model="m",phase="weights"}' in before
    timer.ready()
    after = generate_latest(reg).decode()
    assert f'tailserve:startup_seconds{{model="m"}} {timer.ready_seconds}' in after


def test_pip_raw_progress_becomes_one_line_per_tenth() -> None:
    assert parse_progress("Progress 512 of 1024\n") == (512, 1024)
    assert parse_progress("Collecting x==1") is None
    out = io.StringIO()
    line = ProgressLine(out)
    line.start("m.whl")
    for done in range(0, 1001, 50):
        line.update(done * 1000, 1_000_000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # 0%, 10%, …, 100%: not one per raw line
    assert lines[-1] == "downloading m.whl: 1.0 of 1.0 MB (100%)"
