"""Image verification in worker processes: a deadline per file, and a decoder crash costs one file.

Pillow's decoders run C code on untrusted bytes. In the stage's own process a file
that makes one loop for minutes, or crash the interpreter outright, would stop
every other file with it. Here each file is decoded (`images.verify`: a full
decode and the conversion the models do) by a small worker process that speaks
one JSON line per file over its pipes: a worker that misses the deadline is
killed, one that dies is replaced, and either way that file alone fails with the
reason. Workers also put every core to work on decoding, where threads would
share one interpreter. Verification is the gate to the store: every later
stage decodes only files that decoded within the deadline here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from clipgram import images

log = logging.getLogger("clipgram.verify")

def usable_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class VerifySettings:
    max_pixels: int = 89_478_485
    deadline_s: float = 20.0     # one file's decode; longer is that file's failure
    workers: int = 0             # 0: one per core


class _Worker:
    """One decoding process and its pipes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clipgram.verifier"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def ask(self, request: dict, deadline_s: float) -> dict | str:
        """The worker's answer, or why there is none ("deadline" or "crashed": the worker is gone)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        ready: list = []
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], deadline_s)
            line = self.proc.stdout.readline() if ready else b""
        except (BrokenPipeError, OSError):
            line = b""
        if line:
            return json.loads(line)
        crashed = bool(ready) or self.proc.poll() is not None  # end of file, or a broken pipe
        self.kill()
        return "crashed" if crashed else "deadline"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):  # a dead worker's unflushed request
                    pipe.close()


class Verifier:
    """`verify(path)` from any thread, decoded by up to `settings.workers` processes."""

    def __init__(self, settings: VerifySettings = VerifySettings()) -> None:
        self.settings = settings
        self.size = settings.workers or usable_cores()
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._started = 0
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()

    def _take(self) -> _Worker:
        with self._lock:
            if self._idle.empty() and self._started < self.size:
                self._started += 1
                worker = _Worker()
                self._all.add(worker)
                return worker
        return self._idle.get()

    def _replace(self, worker: _Worker) -> None:
        """A fresh worker for one that is gone: another thread may be waiting for an idle one."""
        fresh = _Worker()
        with self._lock:
            self._all.discard(worker)
            self._all.add(fresh)
        self._idle.put(fresh)

    def verify(self, path: Path) -> images.ImageInfo:
        """`images.verify(path)`, within the deadline; BadImage saying why not."""
        worker = self._take()
        answer = worker.ask({"path": str(path), "max_pixels": self.settings.max_pixels},
                            self.settings.deadline_s)
        if isinstance(answer, str):
            self._replace(worker)
            if answer == "crashed":
                raise images.BadImage("the image decoder crashed on this file "
                                      f"(exit code {worker.proc.returncode})")
            raise images.BadImage(
                f"decoding took longer than {self.settings.deadline_s:g} s "
                "(download.decode_deadline_s); the file was left out")
        self._idle.put(worker)
        if "error" in answer:
            raise images.BadImage(answer["error"])
        return images.ImageInfo(answer["format"], answer["width"], answer["height"])

    def close(self) -> None:
        with self._lock:
            workers, self._all = list(self._all), set()
            self._started = 0
        for worker in workers:
            worker.kill()

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve() -> None:
    """The worker's loop: a JSON request per line in, a JSON answer per line out."""
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            info = images.verify(Path(request["path"]), request["max_pixels"])
            answer: dict = {"format": info.format, "width": info.width, "height": info.height}
        except images.BadImage as e:
            answer = {"error": str(e)}
        except Exception as e:  # os-level trouble reading the file: still this file's failure
            answer = {"error": f"cannot read the file: {images.reason(e)}"}
        sys.stdout.buffer.write(json.dumps(answer).encode() + b"\n")
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    _serve()
