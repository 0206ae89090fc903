"""Child processes, supervised one way: vLLM, Envoy, the local stack's parts, test fixtures, benchmarks.

Other people's processes share the machines this runs on, so a child is only ever
addressed through what we got when we spawned it: its PID, which leads its own
process group (``start_new_session``), so ``stop`` takes down the child *and*
whatever it forked (vLLM's EngineCore, a shell's grandchildren) and nothing else.
Children also get a parent-death signal, so a killed pytest or stack leaves no
engine running on.  That signal is set *after* exec, by ``setpriv --pdeathsig`` (util-linux) or a
tiny Python trampoline, never by a ``preexec_fn``: a ``preexec_fn`` makes ``subprocess`` fork()
instead of vfork(), and the forked copy of this process runs gRPC's at-fork handlers, which restart
gRPC's poller threads there; ``close_fds`` then closes their epoll fd and the copy aborts
(``Epoll1Poller ... epoll_wait error: Bad file descriptor``, exit -6) or segfaults before it could
exec -- reported as the *child* (Envoy, vLLM) dying at start-up.
``spawn`` is synchronous (``subprocess.Popen``) so sync fixtures and scripts use the same supervisor
as async code; waiting is async.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

Ready = str | Callable[[], Awaitable[bool]]
"""What says a child is ready: a URL that must answer 200, or an async predicate."""
Progress = Callable[[str], None]

_NOTE_EVERY_S = 10.0


class NotReady(RuntimeError):
    """The child exited, or was not ready in time; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (the OS picks it); hand it to a child at once, it can be taken meanwhile."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tokenslice_argv(*args: str) -> list[str]:
    """``tokenslice ARGS`` run with this interpreter, so children work without the venv on PATH."""
    return [sys.executable, "-m", "tokenslice", *args]


_TRAMPOLINE = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(f"parent {sys.argv[1]} died before its child {sys.argv[2]} started")
os.execvp(sys.argv[2], sys.argv[2:])
"""
"""Sets the parent-death signal in a fresh interpreter, then execs the child; closes the race with the
parent dying before ``prctl`` by checking the parent is still the one that spawned it."""


def with_death_signal(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped so the child gets SIGTERM when the thread that spawned it exits.

    The wrapper execs ``argv`` in the same process (same PID and group).  Linux sends the signal when
    the *thread* that spawned the child exits: spawn from a long-lived thread (the event loop's, the
    main one), never from a short-lived worker.  ``setpriv`` when util-linux has it, else a Python
    trampoline; both run after exec, so nothing of this process runs in the child.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "TERM", "--", *argv]
    return [sys.executable, "-c", _TRAMPOLINE, str(os.getpid()), *argv]


@dataclass
class ManagedProcess:
    """A child leading its own process group, its stdout+stderr in ``log_path``."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] = field(default_factory=list)
    stopped: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop_sync(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout_s``; reaps the child. Idempotent:
        once the group is gone its id may be reused by someone else's process, so it is never signalled again."""
        if not self.stopped:
            stop_group(self.popen, timeout_s)
            self.stopped = True

    async def stop(self, timeout_s: float = 15.0) -> None:
        await asyncio.to_thread(self.stop_sync, timeout_s)


def spawn(name: str, argv: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
          cwd: str | os.PathLike[str] | None = None, append_log: bool = False) -> ManagedProcess:
    """Start ``argv`` in a new session, output to ``log_path``; ``env`` is the whole environment (default ours)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab" if append_log else "wb") as log:
        if append_log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
        popen = subprocess.Popen(with_death_signal(argv), stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, env=dict(env) if env is not None else None, cwd=cwd,
                                 start_new_session=True)
    return ManagedProcess(name, popen, log_path, list(argv))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the id was reused by someone else's process: not ours any more
        return False
    return True


def stop_group(popen: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM the group ``popen`` leads, SIGKILL stragglers after ``timeout_s``, until no member is left.

    Waiting for the leader alone is not enough: its children outlive it for a moment (vLLM's EngineCore).
    """
    pgid = popen.pid
    if popen.poll() is not None and not _group_alive(pgid):
        return  # leader reaped and no member left: the id may belong to someone else by now
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        popen.poll()  # reap the leader so it does not linger as a zombie
        if not _group_alive(pgid):
            return
        time.sleep(0.05)  # polling a condition with a deadline
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    popen.wait()
    while _group_alive(pgid) and time.monotonic() < deadline + 5:
        time.sleep(0.05)


async def http_ok(url: str, ok: tuple[int, ...] = (200,)) -> bool:
    """One GET: True when ``url`` answers with a status in ``ok``; False on any connection error."""
    with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with session.get(url) as resp:
                return resp.status in ok
    return False


async def wait_ready(proc: ManagedProcess | None, ready: Ready, timeout_s: float, *,
                     progress: Progress | None = None, interval_s: float = 0.1) -> None:
    """Poll ``ready`` (a URL answering 200, or a predicate) until true; fail early, with the log tail, if
    ``proc`` exits, and with :class:`NotReady` after ``timeout_s``. ``progress`` hears a line every 10 s."""
    check = ready if callable(ready) else (lambda: http_ok(ready))
    what = ready if isinstance(ready, str) else getattr(ready, "__name__", "its readiness check")
    name = proc.name if proc else what
    loop = asyncio.get_running_loop()
    started = loop.time()
    next_note = started + _NOTE_EVERY_S
    while True:
        if proc is not None and not proc.running:
            raise NotReady(f"{proc.name} exited with {proc.returncode} before it was ready; log "
                           f"{proc.log_path}:\n{proc.log_tail()}")
        if await check():
            return
        now = loop.time()
        if now - started > timeout_s:
            tail = f"; log {proc.log_path}:\n{proc.log_tail()}" if proc else ""
            raise NotReady(f"{name} not ready at {what} after {timeout_s:.0f}s{tail}")
        if progress is not None and now >= next_note:
            last = proc.log_tail(1).strip()[-120:] if proc else ""
            progress(f"waiting for {name} ({now - started:.0f}s) ... {last}")
            next_note = now + _NOTE_EVERY_S
        await asyncio.sleep(interval_s)  # polling a condition with a deadline, not synchronisation by sleep


async def wait_http(url: str, timeout_s: float, proc: ManagedProcess | None = None) -> None:
    """``wait_ready`` for a URL: the one way to wait until a server answers 200."""
    await wait_ready(proc, url, timeout_s)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True
