"""Report relays: a fleet's agents fan in to the controller through a few batching actors.

One Ray actor call per agent per second is 2,048 calls a second into one controller at 2,048 nodes, and Ray's
per-call cost, not the controller's work, is then the limit. A relay takes the report frames of up to
`controller.relay_fanout` agents (herdsman/wire.py), joins them without decoding anything, and forwards one
`ingest` call every `controller.relay_flush_s`, at once for a frame that may end an attempt (critical evidence,
a failed rank). Forwarding is synchronous, one batch in flight per relay: a slow controller makes batches larger,
not calls more numerous, and a batch that fails is kept and sent again, so the controller sees every frame its
agents sent. Only while the controller stays unreachable past the buffer cap are the oldest frames dropped
(counted). Relays are owned by the controller and end with it; agents whose relay is gone call the controller
directly until the next controller names new relays.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from herdsman import RAY_NAMESPACE, controller_name

log = logging.getLogger("herdsman.relay")


def relay_name(job: str, index: int) -> str:
    return f"herdsman-relay-{job}-{index}"


def assign(hosts: list[str], job: str, fanout: int) -> dict[str, str]:
    """Each host's relay ("" for none: a fleet no larger than one relay's fanout calls the controller directly)."""
    if fanout <= 0 or len(hosts) <= fanout:
        return {h: "" for h in hosts}
    return {h: relay_name(job, i // fanout) for i, h in enumerate(sorted(hosts))}


class Relay:
    def __init__(self, job: str, flush_s: float = 0.1, forward: Callable[[bytes], Any] | None = None,
                 max_buffered_bytes: int = 256 << 20, start: bool = True):
        self.job, self.flush_s, self.max_buffered_bytes = job, flush_s, max_buffered_bytes
        self._forward = forward or self._to_controller
        self._controller: Any = None
        self._frames: list[bytes] = []
        self._bytes = 0
        self._lock = threading.Lock()  # the buffer
        self._sending = threading.Lock()  # one batch in flight, in order
        self.frames_in = self.frames_out = self.dropped = self.failed_sends = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name=f"relay-{job}", daemon=True)
            self._thread.start()

    def send(self, frame: bytes, urgent: bool = False) -> None:
        with self._lock:
            self._frames.append(frame)
            self._bytes += len(frame)
            self.frames_in += 1
        if urgent:
            self.flush()

    def flush(self) -> int:
        """Forward what is buffered; returns how many frames went. A failed forward keeps them for the next."""
        with self._sending:
            with self._lock:
                frames, self._frames, self._bytes = self._frames, [], 0
            if not frames:
                return 0
            try:
                self._forward(b"".join(frames))
            except Exception as e:
                self.failed_sends += 1
                self._controller = None  # look it up again: a restarted controller is a new actor
                if self.failed_sends == 1 or self.failed_sends % 100 == 0:
                    log.warning("relay %s: controller unreachable (%s: %s); %d frame(s) kept",
                                self.job, type(e).__name__, e, len(frames))
                self._keep(frames)
                return 0
            self.frames_out += len(frames)
            return len(frames)

    def _keep(self, frames: list[bytes]) -> None:
        with self._lock:
            self._frames = frames + self._frames
            self._bytes += sum(len(f) for f in frames)
            while self._bytes > self.max_buffered_bytes and self._frames:  # the oldest heartbeats matter least
                self._bytes -= len(self._frames.pop(0))
                self.dropped += 1

    def _to_controller(self, blob: bytes) -> None:
        import ray

        if self._controller is None:
            self._controller = ray.get_actor(controller_name(self.job), namespace=RAY_NAMESPACE)
        ray.get(self._controller.ingest.remote(blob), timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"frames_in": self.frames_in, "frames_out": self.frames_out, "buffered": len(self._frames),
                    "dropped": self.dropped, "failed_sends": self.failed_sends}

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()


def relay_actor() -> Any:
    import ray

    return ray.remote(num_cpus=0, max_concurrency=64)(Relay)
