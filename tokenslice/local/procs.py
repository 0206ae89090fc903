"""Child processes of the local stack: each in its own process group, stopped by PID, never by name.

Other people's processes share this machine, so everything here is addressed by
the PID we got when we spawned it.  Children also get ``PR_SET_PDEATHSIG`` so
they die with the stack even if the stack itself is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (bind to 0); the caller hands it to a child at once."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ManagedProcess:
    """A child in its own session/process group, with its output in ``log_path``."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    async def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the child's process group, SIGKILL it after ``timeout_s``; always reaps the child."""
        if self.process.returncode is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except TimeoutError:
                _signal_group(self.pid, signal.SIGKILL)
                await self.process.wait()
        # grandchildren that outlived the leader
        _signal_group(self.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def spawn(name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                cwd: str | os.PathLike[str] | None = None) -> ManagedProcess:
    """Start ``argv`` in a new session with stdout+stderr to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
            preexec_fn=_die_with_parent)
    return ManagedProcess(name, process, log_path)


def tokenslice_argv(*args: str) -> list[str]:
    """``tokenslice ARGS`` run with this interpreter, so the stack works without the venv on PATH."""
    return [sys.executable, "-m", "tokenslice", *args]


async def wait_http(proc: ManagedProcess, url: str, timeout_s: float, ok: tuple[int, ...] = (200,)) -> None:
    """Poll ``url`` until it answers with one of ``ok``; fail early with the log tail if the child exits."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            if not proc.running:
                raise RuntimeError(f"{proc.name} exited with {proc.process.returncode}; log "
                                   f"{proc.log_path}:\n{proc.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.get(url) as resp:
                    if resp.status in ok:
                        return
            if loop.time() > deadline:
                raise TimeoutError(f"{proc.name} not ready at {url} after {timeout_s:.0f}s; log "
                                   f"{proc.log_path}:\n{proc.log_tail()}")
            await asyncio.sleep(0.1)  # polling a condition with a deadline


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
