"""The one process supervisor: process groups, readiness, the parent-death signal (real processes, no fakes)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tokenslice import procs
from tokenslice.procs import NotReady, pid_alive, spawn, wait_http, wait_ready


async def _until(predicate, timeout_s: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)  # polling a condition with a deadline
    return True


async def test_stop_takes_down_the_whole_process_group(tmp_path: Path) -> None:
    # a child that starts a grandchild and ignores SIGTERM: stop() must still leave nothing behind
    script = "trap '' TERM; sleep 300 & echo $! > grandchild.pid; wait"
    proc = spawn("stubborn", ["sh", "-c", script], tmp_path / "stubborn.log", cwd=tmp_path)
    pidfile = tmp_path / "grandchild.pid"
    assert await _until(lambda: pidfile.exists() and pidfile.read_text().strip())
    grandchild = int(pidfile.read_text())
    assert pid_alive(proc.pid) and pid_alive(grandchild)
    await proc.stop(timeout_s=0.5)
    assert await _until(lambda: not pid_alive(proc.pid) and not pid_alive(grandchild))
    assert proc.returncode is not None
    await proc.stop()  # idempotent: the group is never signalled again (its id may be someone else's now)


async def test_wait_ready_fails_fast_with_the_log_when_the_child_dies(tmp_path: Path) -> None:
    proc = spawn("broken", ["sh", "-c", "echo cannot start: port taken; exit 3"], tmp_path / "b.log")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NotReady, match="port taken"):
        await wait_http("http://127.0.0.1:9/health", 30, proc)
    assert loop.time() - started < 10  # did not wait for the 30 s deadline
    await proc.stop()


async def test_wait_ready_takes_a_predicate_and_times_out(tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    proc = spawn("slow", ["sh", "-c", f"sleep 0.3; touch {flag}; sleep 300"], tmp_path / "s.log")
    try:
        async def exists() -> bool:
            return flag.exists()

        await wait_ready(proc, exists, 20)
        assert flag.exists()

        async def never() -> bool:
            return False

        with pytest.raises(NotReady, match="not ready"):
            await wait_ready(proc, never, 0.3)
    finally:
        await proc.stop()


_PARENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tokenslice.procs import spawn
    child = spawn("sleeper", [sys.argv[2], "300"], Path(sys.argv[1]) / "sleeper.log")
    (Path(sys.argv[1]) / "child.pid").write_text(str(child.pid))
    time.sleep(300)
""")


@pytest.mark.parametrize("mechanism", ["setpriv", "trampoline"])
async def test_children_die_with_a_killed_parent(tmp_path: Path, mechanism: str) -> None:
    """A SIGKILLed supervisor (a killed pytest, a crashed stack) must not leave its children running.

    Both ways of setting the death signal: ``setpriv`` where util-linux has it, and the Python
    trampoline where it does not (a PATH without ``setpriv``).
    """
    env = dict(os.environ)
    if mechanism == "trampoline":
        env["PATH"] = str(tmp_path)  # no setpriv here; the child is named by its absolute path
    elif shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is missing on this machine")
    sleep = shutil.which("sleep")
    assert sleep is not None
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tmp_path), sleep], start_new_session=True,
                              env=env)
    pidfile = tmp_path / "child.pid"
    try:
        assert await _until(lambda: pidfile.exists() and pidfile.read_text().strip(), 30)
        child = int(pidfile.read_text())
        assert pid_alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        # the child leads its own group, so only the death signal can have ended it
        assert await _until(lambda: not pid_alive(child)), "child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            os.kill(parent.pid, signal.SIGKILL)
            parent.wait()
        if pidfile.exists() and pid_alive(int(pidfile.read_text())):
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)


def test_free_port_is_bindable() -> None:
    import socket

    port = procs.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


_GRPC_PARENT = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from tokenslice.procs import free_port, spawn

    async def main(folder: Path, n: int) -> None:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            done = asyncio.Event()

            async def busy() -> None:
                while not done.is_set():
                    await stub.Check(health_pb2.HealthCheckRequest())

            callers = [asyncio.create_task(busy()) for _ in range(4)]
            codes = []
            for i in range(n):
                child = spawn("true", ["true"], folder / f"true-{i}.log")
                codes.append(await asyncio.to_thread(child.popen.wait))
            done.set()
            await asyncio.gather(*callers)
        await server.stop(None)
        print(sorted(set(codes)), sum(c != 0 for c in codes))

    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))
""")


def test_spawn_beside_a_busy_grpc_server_runs_nothing_of_ours_in_the_child(tmp_path: Path) -> None:
    """The picker is a gRPC server: spawning Envoy beside it must not run gRPC's at-fork handlers in the child.

    With a ``preexec_fn`` the forked copy restarted gRPC's pollers, lost their epoll fd to ``close_fds`` and
    aborted (``Epoll1Poller ... Bad file descriptor``, -6) or segfaulted before exec in about a third of
    spawns -- seen as Envoy dying at start-up.  Here ``true`` is spawned 50 times beside a busy server.
    """
    out = subprocess.run([sys.executable, "-c", _GRPC_PARENT, str(tmp_path), "50"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[0] == "[0] 0", out.stdout + out.stderr[-2000:]
