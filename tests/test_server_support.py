"""Helpers for the HTTP tests (no tests here): start the real runner as a subprocess, the way `ollama serve` does
(`python -m runner.cli runner --model … --port P`), poll /health like llm/server.go, read NDJSON streams."""
from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable  # the venv's interpreter when run as `.venv/bin/python -m pytest`
HEALTH_DEADLINE_S = 0.2  # llm/server.go WaitUntilRunning: each /health poll has a 200 ms timeout


def free_port() -> int:
    """A port the kernel just handed out (the Go server does the same, equally racy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HealthPoll:
    t: float  # seconds since the process was started
    latency: float  # seconds the request took
    body: dict[str, Any]
    lost: float = 0.0  # seconds of that latency in which this test process itself could not run (see PauseProbe)

    @property
    def runner_latency(self) -> float:
        """What the runner is answerable for: the round trip less the test process's own stalls."""
        return self.latency - self.lost


class PauseProbe:
    """Measures when this test process could not run, so a /health latency test judges the runner, not the machine.

    On a shared 2-core CI machine a poll can take over 200 ms although the runner answered at once: this process
    was descheduled, or stopped for a full garbage collection of the whole test session's heap. Inside the block the
    collector is off, and a thread that sleeps 2 ms at a time records each wake-up over 1 ms late; `lost(t0, t1)` is
    the lateness that fell inside [t0, t1]. A runner that stalls leaves the poller blocked in a socket read (the GIL
    released), so this thread wakes on time and nothing is subtracted: a real stall still fails the test."""

    TICK_S = 0.002
    STALL_S = 0.001

    def __init__(self) -> None:
        self._late: list[tuple[float, float]] = []  # (when the wake-up was due, when it came)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pause-probe", daemon=True)
        self._gc_was_enabled = False

    def _run(self) -> None:
        while not self._stop.is_set():
            due = time.monotonic() + self.TICK_S
            time.sleep(self.TICK_S)
            woke = time.monotonic()
            if woke > due + self.STALL_S:  # a normal wake-up is tens of microseconds late: not a stall
                self._late.append((due, woke))

    def __enter__(self) -> PauseProbe:
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._gc_was_enabled:
            gc.enable()

    def lost(self, t0: float, t1: float) -> float:
        return sum(max(0.0, min(woke, t1) - max(due, t0)) for due, woke in list(self._late))


class HealthWatch:
    """Polls /health on a thread every `interval` seconds while the block runs (inside a PauseProbe); each answer is
    kept as a HealthPoll whose `t` is seconds since `t_start`."""

    def __init__(self, url: str, t_start: float, interval: float = 0.01,
                 check: Callable[[httpx.Response], None] | None = None) -> None:
        self.url, self.t_start, self.interval, self.check = url, t_start, interval, check
        self.polls: list[HealthPoll] = []
        self._probe = PauseProbe()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)
        self._errors: list[BaseException] = []

    def _run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=10.0) as c:
                while not self._stop.is_set():
                    t0 = time.monotonic()
                    r = c.get("/health")
                    t1 = time.monotonic()
                    if self.check is not None:
                        self.check(r)
                    self.polls.append(HealthPoll(t0 - self.t_start, t1 - t0, r.json()))  # `lost` is set at exit
                    self._stop.wait(self.interval)
        except BaseException as e:  # surfaced by __exit__ in the test's thread
            self._errors.append(e)

    def __enter__(self) -> HealthWatch:
        self._probe.__enter__()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(30)
        self._probe.__exit__()
        for p in self.polls:
            t0 = p.t + self.t_start
            p.lost = self._probe.lost(t0, t0 + p.latency)
        if self._errors and exc is None:
            raise self._errors[0]

    def between(self, t0: float, t1: float) -> list[HealthPoll]:
        """The polls that started between the monotonic times t0 and t1."""
        return [p for p in self.polls if t0 <= p.t + self.t_start <= t1]


def worst_latency(polls: Sequence[HealthPoll]) -> HealthPoll:
    """The poll the runner took longest over (its round trip less the test process's own stalls)."""
    return max(polls, key=lambda p: p.runner_latency)


def describe(p: HealthPoll) -> str:
    return f"{p.runner_latency * 1000:.1f} ms (round trip {p.latency * 1000:.1f} ms, test process stalled " \
           f"{p.lost * 1000:.1f} ms of it)"


@dataclass
class RunnerProcess:
    """A runner subprocess on 127.0.0.1:port; stderr goes to a file (a pipe nobody reads could fill up)."""

    proc: subprocess.Popen[bytes]
    port: int
    stderr_path: Path
    t_start: float
    load_polls: list[HealthPoll] = field(default_factory=list)

    @classmethod
    def start(cls, model: Path | str, args: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None,
              name: str = "runner") -> RunnerProcess:
        port = free_port()
        stderr_path = log_dir / f"{name}-{port}.stderr"
        full_env = dict(os.environ)
        full_env.pop("OLLAMA_RUNNER_DIALECT", None)  # the dialect comes only from what the test asks for
        full_env.update(env or {})
        cmd = [PYTHON, "-m", "runner.cli", "runner", "--ollama-engine", "--model", str(model), *args,
               "--port", str(port)]
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=err)
        return cls(proc, port, stderr_path, time.monotonic())

    @classmethod
    def serving(cls, model: Path | str, args: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None,
                name: str = "runner") -> Iterator[RunnerProcess]:
        """For a fixture (`yield from`): the runner, started and ready; killed afterwards."""
        r = cls.start(model, args, log_dir, env=env, name=name)
        try:
            r.wait_ready()
            yield r
        finally:
            r.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def wait_ready(self, timeout: float = 120.0) -> list[HealthPoll]:
        """Poll /health as fast as possible from process start until status is ready (0 or "ok"); every answer is
        recorded in `load_polls` with its latency. Fails if the process dies or never gets ready."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5.0) as c, PauseProbe() as probe:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"runner exited with {self.proc.returncode}:\n{self.stderr()[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"runner not ready after {timeout}s:\n{self.stderr()[-3000:]}")
                t0 = time.monotonic()
                try:
                    r = c.get("/health")
                except httpx.TransportError:  # not listening yet
                    time.sleep(0.005)
                    continue
                t1 = time.monotonic()
                body = r.json()
                self.load_polls.append(HealthPoll(t0 - self.t_start, t1 - t0, body, probe.lost(t0, t1)))
                if body.get("status") in (0, "ok"):
                    return self.load_polls
                time.sleep(0.002)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # Ollama unloads a runner with SIGKILL
        self.proc.wait(timeout=30)


@dataclass
class Stream:
    """A whole /completion answer: status, raw lines, parsed lines."""

    status: int
    headers: httpx.Headers
    lines: list[str]
    objects: list[dict[str, Any]]
    body: bytes = b""

    @property
    def text(self) -> str:
        return "".join(o.get("content", "") for o in self.objects)

    @property
    def final(self) -> dict[str, Any]:
        return self.objects[-1]


def complete(client: httpx.Client, body: Mapping[str, Any] | bytes) -> Stream:
    """POST /completion and read the NDJSON stream to its end."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    with client.stream("POST", "/completion", content=content, headers=headers) as r:
        data = r.read()
    if r.status_code != 200:
        return Stream(r.status_code, r.headers, [], [], data)
    lines = data.decode("utf-8").split("\n")
    assert lines[-1] == "", f"stream does not end with a newline: {data[-200:]!r}"
    lines = lines[:-1]
    return Stream(200, r.headers, lines, [json.loads(ln) for ln in lines], data)


def p3_request(prompt: str, **options: Any) -> dict[str, Any]:
    """A P2/P3 body as llm/server.go sends it (Go field names, `Options` with omitempty semantics)."""
    return {"Prompt": prompt, "Format": None, "Images": None, "Options": options, "Grammar": ""}

