"""How the processes of a run end: children that die with their parent, and stop requests.

- :func:`end_children_with_this_process`: every process this one forks is killed when it dies,
  however it dies (a SIGKILL too), so that no checkpoint writer or helper outlives a killed run.
- :class:`StopRequests`: SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) ask the run to
  stop at its next step boundary, where it writes a checkpoint and ends with :class:`RunStopped`;
  a second signal, or no boundary within a grace period, ends it at once. The same signal again
  within :attr:`StopRequests.RELAY_S` is the first one relayed (SLURM signals every process of a
  job step, and torchrun forwards the one it gets to its workers), not a second request. A stop
  file (``checkpoint.stop_file``) that appears asks the same as SIGTERM, with no relay at all: what
  the SLURM launcher writes when its batch script is signalled.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

_PR_SET_PDEATHSIG = 1
_CHILDREN_END_WITH_US = False  # registered once per process


def end_children_with_this_process() -> None:
    """From now on, every process this one forks is killed when this one dies (Linux's
    PR_SET_PDEATHSIG, set in each child right after the fork).

    Checkpoint writers, the fork Manager that relays their results, and whatever libraries fork
    would otherwise outlive a killed run, holding gigabytes (and multiprocessing's resource
    tracker, which exits once no process holds its pipe, with them). The signal fires when the
    forking *thread* ends, so it is meant for processes that fork from their main thread, as the
    trainer and the conversion tools do. A no-op where prctl is not available.
    """
    global _CHILDREN_END_WITH_US
    if _CHILDREN_END_WITH_US or _LIBC is None:
        return
    os.register_at_fork(after_in_child=die_with_parent)
    _CHILDREN_END_WITH_US = True


def _libc() -> ctypes.CDLL | None:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None


_LIBC = _libc()  # loaded in the parent: a child between fork and exec only calls into it


def die_with_parent() -> None:
    """For ``subprocess.Popen(preexec_fn=...)``: the child is killed when the process that started it
    dies (``subprocess`` does not run the at-fork hooks of :func:`end_children_with_this_process`).
    It only calls prctl, so it is safe in a child forked from a threaded process."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class RunStopped(Exception):
    """The run stopped at a step boundary because a signal asked it to (its checkpoint is written)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step = signum, step
        saved = f"its checkpoint {checkpoint} is written: rerun the same command to resume" if checkpoint \
            else "no checkpoint (checkpoints are off)"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {saved}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by the signal


class StopRequests:
    """Within the block, SIGTERM and SIGINT set :attr:`signum` instead of ending the process; the run
    then stops at its next step boundary. If that boundary does not come within ``grace_s`` seconds
    (a step still running, a collective waiting for a rank that died), or a second signal comes,
    the process ends at once with exit code 128 + the signal.

    Python runs signal handlers only when the main thread executes Python code, which it does not
    while it waits in a collective; so the signal is taken from the handler's wakeup pipe by a
    watcher thread, which notes it (and keeps the time) even then. Only in the main thread (where
    handlers are installed); elsewhere a no-op.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    RELAY_S = 5.0  # the same signal within this many seconds is the first one, relayed

    def __init__(self, grace_s: float, stop_file: str | Path | None = None):
        self.grace_s = grace_s
        self.stop_file = Path(stop_file) if stop_file else None
        self.signum: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, object] = {}
        self._pipe: tuple[int, int] | None = None
        self._previous_fd = -1
        self._done = threading.Event()

    def __enter__(self) -> Self:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._pipe = os.pipe()
        os.set_blocking(self._pipe[1], False)
        self._previous_fd = signal.set_wakeup_fd(self._pipe[1])
        self._previous = {s: signal.signal(s, lambda signum, frame: None) for s in self.SIGNALS}
        threading.Thread(target=self._watch, name="stop-requests", daemon=True).start()
        return self

    @property
    def requested(self) -> int | None:
        """The stop request so far: the signal received, SIGTERM for a stop file that exists, or None."""
        if self.signum is None and self.stop_file is not None and self.stop_file.exists():
            return signal.SIGTERM
        return self.signum

    def _watch(self) -> None:
        try:
            self._receive()
        finally:
            os.close(self._pipe[0])

    def _receive(self) -> None:
        while True:
            received = os.read(self._pipe[0], 1)
            if not received or self._done.is_set():
                return
            signum = received[0]
            if signum not in self.SIGNALS:
                continue  # the wakeup pipe carries every signal Python handles
            if self.signum is not None:
                if signum == self.signum and time.monotonic() - self._received_at < self.RELAY_S:
                    continue
                self._end(signum, "a second stop request")
            self.signum, self._received_at = signum, time.monotonic()
            threading.Thread(target=self._deadline, args=(signum,), daemon=True).start()

    def _deadline(self, signum: int) -> None:
        if not self._done.wait(self.grace_s):
            self._end(signum, f"no step boundary within {self.grace_s:g} s")

    @staticmethod
    def _end(signum: int, why: str) -> None:
        print(f"opsd: {signal.Signals(signum).name}: {why}, ending at once", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        if self._pipe is None:
            return
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._pipe[1])  # the watcher reads end-of-file and ends
