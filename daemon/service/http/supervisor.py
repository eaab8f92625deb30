"""The daemon's side of the HTTP front: start it as a child process once the daemon's
socket is bound, restart it if it dies, stop it with the daemon."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..process import StartError
from .listen import parse_listen

log = logging.getLogger("agentkv.http")

START_TIMEOUT_S = 60.0  # the front's imports on a loaded 2-core machine take seconds
STOP_WAIT_S = 5.0
RESTART_PAUSE_S = 1.0
MAX_RESTARTS = 5  # in a row without a minute of service: then the daemon serves without it


class HttpFront:
    """The HTTP front's process, supervised.

    Args:
        listen: HOST:PORT.
        endpoint: the daemon's socket.
        auth_key: the daemon's key file, if it has one.
        api_key: the HTTP API key file, if any.
        log_file: where the front's output goes (the daemon's log).
    """

    def __init__(
        self,
        listen: str,
        endpoint: str,
        auth_key: Path | None,
        api_key: Path | None,
        log_file: Path,
    ) -> None:
        self.listen = listen
        self.host, self.port = parse_listen(listen, api_key is not None)
        self._args = [sys.executable, "-m", "agentkv.daemon.service.http", "--listen", listen]
        self._args += ["--socket", endpoint, "--parent-pid", str(os.getpid())]
        for flag, value in (("--auth-key", auth_key), ("--api-key", api_key)):
            if value is not None:
                self._args += [flag, str(value)]
        self._log_file = log_file
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Start the front and wait until it accepts connections.

        Raises:
            StartError: it exited first (the port is taken, ...) or did not listen in time.
        """
        self._spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._accepts():
            if self._proc.poll() is not None:
                raise StartError(
                    f"the HTTP front on {self.listen} exited with {self._proc.returncode} "
                    "(see the daemon log)"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise StartError(f"the HTTP front did not listen on {self.listen} in time")
            time.sleep(0.1)
        log.info("HTTP front listening on http://%s (pid %d)", self.listen, self._proc.pid)
        self._watcher = threading.Thread(target=self._watch, name="agentkv-http", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """Stop the front: SIGTERM, then SIGKILL if it lingers."""
        self._stopping.set()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _spawn(self) -> None:
        with open(self._log_file, "ab") as out:
            self._proc = subprocess.Popen(
                self._args, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )

    def _accepts(self) -> bool:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            try:
                s.connect((self.host, self.port))
            except OSError:
                return False
        return True

    def _watch(self) -> None:
        """Restart a front that died while the daemon runs (a few times in a row)."""
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            code = self._proc.wait()
            if self._stopping.is_set():
                return
            failures = 1 if time.monotonic() - started > 60 else failures + 1
            if failures > MAX_RESTARTS:
                log.error("the HTTP front keeps exiting (%d): serving without it", code)
                return
            log.error("the HTTP front exited with %d: restarting it", code)
            time.sleep(RESTART_PAUSE_S)
            if not self._stopping.is_set():
                self._spawn()
