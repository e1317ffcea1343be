"""Where a server's CPU goes: py-spy stacks summarised, and CPU time read from /proc.

`py-spy record --format raw --threads` writes one line per distinct stack: frames from the root,
separated by `;`, the first naming the thread, then a sample count. Two views are useful:

- all samples, less those where a thread only waits (in epoll, or for work in an executor queue,
  which py-spy does not always recognise as idle): where the CPU goes, including C code that runs
  without the GIL (SQLite, socket writes);
- `--gil` samples only: who holds the GIL, the one resource the event loop and the database
  thread share, so what bounds a Python server's throughput.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
THREAD = re.compile(r"^thread \((?P<tid>\d+)\): (?P<name>.*)$")
# Leaf frames that are a thread blocked, not working.
WAITS = ("EpollSelector.select (selectors.py)", "_worker (concurrent/futures/thread.py)")
# Frames that only carry the work: interpreter, thread and event-loop plumbing, the CLI's entry.
PLUMBING = re.compile(
    r"\((<frozen runpy>|threading\.py|asyncio/runners\.py|concurrent/futures/thread\.py|gateway/__main__\.py"
    r"|gateway/cli\.py|aiohttp/web\.py)\)$"
    r"|^(<module>|BaseEventLoop\.(run_forever|run_until_complete|_run_once)|Handle\._run) \("
)
# So are frames on nearly every stack of a thread, whatever they are.
TRUNK_SHARE = 0.97
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds a process has used so far (all its threads); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds used so far by each of a process's threads, by thread id."""
    used: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            used[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return used


@contextlib.contextmanager
def py_spy(pid: int, seconds: float, out: Path, *, rate: int = 100, gil: bool = False) -> Iterator[None]:
    """Record `pid` with py-spy (raw stacks, per thread) for `seconds` while the block runs."""
    argv = ["py-spy", "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    argv += ["--rate", str(rate), "--format", "raw", "--threads", "-o", str(out)]
    proc = subprocess.Popen(
        argv + (["--gil"] if gil else []), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    time.sleep(0.3)  # attached before the load starts
    try:
        yield
    finally:
        _, err = proc.communicate(timeout=seconds + 30)
        if proc.returncode != 0:
            print(f"py-spy failed: {err.decode(errors='replace').strip()}", file=sys.stderr)


def _key(frame: str) -> str:
    """`name (file:line)` -> `name (file)`: one entry per function."""
    match = FRAME.match(frame)
    return f"{match['name']} ({match['file']})" if match else frame


def _package(key: str) -> str:
    """The top-level package of a function key (`X (aiohttp/web_protocol.py)` -> aiohttp)."""
    match = FRAME.match(key)
    file = match["file"] if match else "?"
    return file.split("/", 1)[0] if "/" in file else file.removesuffix(".py")


@dataclass
class Profile:
    """Sample counts from one py-spy raw file."""

    samples: int = 0
    waiting: int = 0
    thread_names: dict[int, str] = field(default_factory=dict)  # native thread id -> Python name
    by_thread: Counter[str] = field(default_factory=Counter)
    self_time: Counter[str] = field(default_factory=Counter)
    total_time: Counter[tuple[str, str]] = field(default_factory=Counter)  # (thread, function)

    @classmethod
    def read(cls, raw: Path) -> Profile:
        """Parse py-spy's raw output, setting aside samples of threads that only wait."""
        profile = cls()
        for line in raw.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count, frames = int(count_text), stack.split(";")
            thread = "?"
            named = THREAD.match(frames[0])
            if named:
                frames.pop(0)
                thread = re.sub(r"_\d+$", "", named["name"])  # executor threads are numbered
                profile.thread_names[int(named["tid"])] = thread
            keys = [_key(f) for f in frames]
            if not keys:
                continue
            if keys[-1] in WAITS:
                profile.waiting += count
                continue
            profile.samples += count
            profile.by_thread[thread] += count
            profile.self_time[keys[-1]] += count
            for key in set(keys):
                profile.total_time[(thread, key)] += count
        return profile

    def summary(self, seconds: float, rate: int, *, top: int = 15, totals: bool = True) -> list[str]:
        """Lines: share by thread and package, top functions by self time and by total time."""
        if not self.samples:
            return ["no samples (is py-spy allowed to attach?)"]
        n = self.samples

        def share(count: int) -> str:
            return f"{100 * count / n:.1f}%"

        packages: Counter[str] = Counter()
        for key, count in self.self_time.items():
            packages[_package(key)] += count
        lines = [
            f"{n} samples at {rate} Hz in {seconds:g} s ({n / (rate * seconds):.2f} threads busy on average; "
            f"{self.waiting} waiting samples left out)",
            "by thread: " + ", ".join(f"{t} {share(c)}" for t, c in self.by_thread.most_common()),
            "by package (self): " + ", ".join(f"{p} {share(c)}" for p, c in packages.most_common(10)),
            f"top {top} functions by self time:",
            *(f"  {share(c):>6}  {k}" for k, c in self.self_time.most_common(top)),
        ]
        if totals:
            work: Counter[str] = Counter()
            for (thread, key), count in self.total_time.items():
                if count < TRUNK_SHARE * self.by_thread[thread] and not PLUMBING.search(key):
                    work[key] += count
            lines.append(f"top {top} functions by total time (thread and event-loop plumbing left out):")
            lines += [f"  {share(c):>6}  {k}" for k, c in work.most_common(top)]
            ours = Counter({k: c for k, c in work.items() if "(gateway/" in k})
            lines.append("the gateway's own functions by total time:")
            lines += [f"  {share(c):>6}  {k}" for k, c in ours.most_common(top)]
        return lines
