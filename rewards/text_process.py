"""Python text rewards (`py:module:function`) run in a child process of their own.

A text reward is arbitrary user code: it may raise, return NaN, or take seconds. Inside the
engine step every second it takes stalls every request, so each call has a time limit. A thread
cannot be stopped; a process can: when a row's call runs past the limit the child is killed, a
fresh one started, and the row counts as failed. Rows are sent one call each, so a failure or a
time-out is charged to the row whose texts caused it.

The protocol is one JSON line each way: the parent sends a list of rows (each a list of texts),
the child answers one line per row, `{"ok": [scores]}` or `{"error": "..."}`, as each is done.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time

log = logging.getLogger("alignd.guides")

Result = list[float] | str  # scores of one row, or why it failed


class TextRewardProcess:
    def __init__(self, spec: str, timeout: float, start_timeout: float = 300.0) -> None:
        self.spec, self.timeout = spec, timeout
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._buffer = b""
        self._start()
        if not self._ready(time.monotonic() + start_timeout):
            raise RuntimeError(f"text reward {spec!r} did not start: {self._why_not_ready}")

    # -- the child's life -------------------------------------------------------------------
    def _start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "alignd.rewards.text_process", self.spec],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        self._buffer, self._is_ready, self._why_not_ready = b"", False, "starting"

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                pipe.close()
            self._proc = None

    def close(self) -> None:
        self._kill()

    def _line(self, deadline: float) -> bytes | None:
        """The child's next line, or None at the deadline or if it died."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _ready(self, deadline: float) -> bool:
        if self._is_ready:
            return True
        line = self._line(deadline)
        if line is None:
            self._why_not_ready = "it is still starting" if self._proc.poll() is None else "it exited"
            return False
        message = json.loads(line)
        if "error" in message:
            self._why_not_ready = message["error"]
            return False
        self._is_ready = True
        return True

    # -- calls --------------------------------------------------------------------------------
    def __call__(self, rows: list[list[str]]) -> list[Result]:
        """Scores of each row's texts, or the reason that row failed. A row that runs past the
        time limit fails; the rows after it get a fresh child, or fail if it is not ready in
        time either."""
        results: list[Result] = []
        while len(results) < len(rows):
            todo = rows[len(results):]
            if self._proc is None or not self._ready(time.monotonic() + self.timeout):
                results += [f"not available ({self._why_not_ready})"] * len(todo)
                break
            try:
                self._proc.stdin.write(json.dumps(todo).encode() + b"\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._restart("it exited")
                continue
            for _ in todo:
                line = self._line(time.monotonic() + self.timeout)
                if line is None:
                    died = self._proc.poll() is not None
                    results.append("its process exited" if died else f"took more than {self.timeout:g} s")
                    self._restart("it exited" if died else "it timed out")
                    break
                answer = json.loads(line)
                results.append(answer["ok"] if "ok" in answer else answer["error"])
        return results

    def _restart(self, why: str) -> None:
        log.warning("text reward %s: %s; starting a fresh process", self.spec, why)
        self._kill()
        self.restarts += 1
        self._start()


def _serve(spec: str) -> None:
    """The child: import the function, warm it up, then answer rows until stdin closes."""
    from alignd.rewards.specs import load_text_reward

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the function's own prints must not corrupt the protocol

    def send(message: dict) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    try:
        fn = load_text_reward(spec)
        try:
            fn(["warm up"])  # lazy model loads happen now, not in the first timed call
        except Exception:  # noqa: BLE001 - a function may refuse odd texts; that is no start-up error
            pass
    except Exception as e:  # noqa: BLE001 - reported to the parent, which refuses to start
        send({"error": f"{type(e).__name__}: {e}"})
        return
    parent = os.getppid()

    def orphaned() -> None:  # a hung call must not outlive the engine
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True).start()
    send({"ready": True})
    for line in sys.stdin.buffer:
        for texts in json.loads(line):
            try:
                send({"ok": [float(x) for x in fn(texts)]})
            except Exception as e:  # noqa: BLE001 - any failure of user code is that row's failure
                send({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    _serve(sys.argv[1])
