"""Ending a long run promptly on SIGINT or SIGTERM, leaving only its resume state.

SIGINT raises KeyboardInterrupt and SIGTERM raises `Terminated` (a
KeyboardInterrupt) in the main thread, so the run unwinds through its context
managers: the staging directory is removed, the resume state stays. Python runs
signal handlers only between bytecodes, and one LAPACK call on a 14336-wide
matrix can take a minute, so a watchdog thread (woken through
`signal.set_wakeup_fd`, which works while the main thread is inside such a
call) gives the unwinding GRACE_S seconds and then removes the registered
temporary paths itself and ends the process with the conventional code
(130 for SIGINT, 143 for SIGTERM). The resume state is never touched: every
file in it is written under a temporary name and renamed (run_state.py).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from typing import Callable, List, Optional

GRACE_S = 3.0
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup runs."""


class Interrupted(KeyboardInterrupt):
    """A run ended by SIGINT or SIGTERM; `message` says where its resume state is."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


def _raise_terminated(_signum, _frame):
    raise Terminated()


class SignalGuard:
    """`with SignalGuard(message) as guard:` ... `guard.temporary(path)` registers a
    path to delete if the watchdog has to end the process itself; `message()`
    gives the line it prints then. A no-op outside the main thread."""

    def __init__(self, message: Callable[[], str]):
        self.message = message
        self.paths: List[str] = []
        self.active = threading.current_thread() is threading.main_thread()
        self._done = threading.Event()
        self._old = {}
        self._fds = None
        self._old_wakeup = -1
        self._thread: Optional[threading.Thread] = None

    def temporary(self, path: Optional[str]) -> None:
        if path:
            self.paths.append(path)

    def forget(self, path: Optional[str]) -> None:
        if path in self.paths:
            self.paths.remove(path)

    def __enter__(self) -> "SignalGuard":
        if not self.active:
            return self
        self._old = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _raise_terminated)
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._fds = (r, w)
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="vllm-neuronmlp-signal-watchdog", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        r = self._fds[0]
        while not self._done.is_set():
            try:
                data = os.read(r, 16)
            except OSError:
                return
            if not data or self._done.is_set():
                return
            signum = data[-1]
            if signum not in (signal.SIGINT, signal.SIGTERM):
                continue
            deadline = time.monotonic() + GRACE_S
            while time.monotonic() < deadline:
                if self._done.wait(0.05):
                    return  # the main thread unwound in time
            for path in list(self.paths):
                shutil.rmtree(path, ignore_errors=True)
            print(f"vllm-neuronmlp: {self.message()}", file=sys.stderr, flush=True)
            os._exit(EXIT_CODES[signum])

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.active:
            return False
        self._done.set()
        signal.set_wakeup_fd(self._old_wakeup)
        for signum, handler in self._old.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        r, w = self._fds
        try:
            os.write(w, b"\0")  # wake the watchdog so it sees _done
        except OSError:
            pass
        self._thread.join(timeout=1.0)
        os.close(r)
        os.close(w)
        return False
