"""Peak memory of a benchmark that runs on a local Ray: this process plus every Ray process it started."""
from __future__ import annotations

import threading

import psutil

_RAY = ("ray::", "raylet", "gcs_server", "ray/_private")  # workers, the raylet, GCS, Ray's agents and monitors


def _is_ray(process: psutil.Process) -> bool:
    return any(marker in " ".join(process.cmdline()) for marker in _RAY)


class RssSampler:
    """Peak of the summed RSS of this process and its descendants that are Ray processes (a local Ray's raylet,
    GCS and workers are all descendants of the driver that started it), sampled every 0.1 s in a thread.
    Other children (a spawned pool, a local S3 server) are left out."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                if _is_ray(child):
                    total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self._sample())

    def __enter__(self) -> "RssSampler":
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
