"""Where the policy comes from: a YAML file polled for changes (local mode, or the ConfigMap the
operator mounts), or the SchedulingPolicy CR (Kubernetes mode, see ``datastore.kube``).

A reload that fails validation keeps the previous policy (and says so in the log and in
``tokenslice_picker_policy_reloads_total{result="invalid"}``); queued chunks are never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from tokenslice.policy import SchedulingPolicySpec, load_policy

log = logging.getLogger("tokenslice_picker.policy")

PolicyCallback = Callable[[SchedulingPolicySpec], None]


class PolicyFile:
    """Poll ``path`` every ``interval_s`` (mtime, size and inode: a ConfigMap swaps a symlink)."""

    def __init__(self, path: str | os.PathLike[str], on_change: PolicyCallback, on_result: Callable[[str], None],
                 interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.on_change = on_change
        self.on_result = on_result
        self.interval_s = interval_s
        self._stamp = self._stat()
        self._task: asyncio.Task[None] | None = None
        self.version = 0

    def load(self) -> SchedulingPolicySpec:
        """The initial load: an invalid policy at start-up is an error, not a warning."""
        self._stamp = self._stat()
        return load_policy(self.path)

    def _stat(self) -> tuple[float, int, int] | None:
        try:
            st = self.path.stat()  # follows the ConfigMap's ..data symlink
        except OSError:
            return None
        return (st.st_mtime, st.st_size, st.st_ino)

    def check(self) -> bool:
        """Reload if the file changed; True when a new policy was applied."""
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            policy = load_policy(self.path)
        except (ValidationError, ValueError, OSError) as exc:
            log.error("policy reload rejected; keeping the previous policy",
                      extra={"path": str(self.path), "error": str(exc)})
            self.on_result("invalid")
            return False
        self.version += 1
        self.on_change(policy)
        self.on_result("applied")
        log.info("policy reloaded", extra={"path": str(self.path), "version": self.version})
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="policy-file")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)  # the polling period (inotify-free by design)
            self.check()
