"""Waiting for a server to come up: poll its ``GET /health`` (stdlib only, usable without the serve extras)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any


def wait_until_healthy(url: str, timeout: float = 300.0, process: Any = None, interval: float = 0.5) -> None:
    """Return once ``GET {url}/health`` answers 200 (the server is warmed up and accepts requests).

    ``url`` is the server's base address, e.g. ``http://127.0.0.1:8000``. ``process`` (a
    ``subprocess.Popen`` running the server, optional) is watched meanwhile: if it exits first,
    ``RuntimeError`` names its exit status. After ``timeout`` seconds without a 200, ``TimeoutError``.
    Each probe waits at most 2 s; probes are ``interval`` seconds apart.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before {url}/health answered")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):  # not listening yet, or 503 while it starts or drains
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url}/health did not answer 200 within {timeout:g} s")
        time.sleep(interval)
