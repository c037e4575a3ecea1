"""The server under an orchestrator: how it stops.

SIGTERM (or SIGINT) drains: the socket stays open and every new request is answered 503 with
`Retry-After` (so that a load balancer still sending here during its own update gets an answer,
not a refused connection), `/ready` turns 503 while `/health` stays 200, and the requests in
flight run to their end for up to `--shutdown-timeout` seconds. Those still running then are
stopped, each answered 503 (a stream: an error event and `[DONE]`), the engine stops, and the
process exits 0. A second signal stops the requests in flight at once. When the engine dies the
server exits 1, for the orchestrator to restart it (app.py notices the death).

uvicorn's own shutdown closes the socket first and then cuts what is still running at its
timeout without a word; so alignd takes the signal itself and hands uvicorn a server that has
nothing left in flight.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from alignd.server.config import ServeSettings

log = logging.getLogger("alignd.server")

# Seconds for stopped requests to send their errors, and for uvicorn to close idle connections.
GRACE = 5.0


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's signal handler. It runs between two bytecodes of whatever the loop is doing,
        # so it only hands the signal to the loop (and is not kept for uvicorn to re-raise).
        if self._loop is None:
            self.should_exit = True
        else:
            self._loop.call_soon_threadsafe(self._signalled, signal.Signals(sig).name)

    def _signalled(self, name: str) -> None:
        admission = self.app.state.served.admission
        if self._drain is None:
            self._drain = asyncio.create_task(self.drain(name))
        elif not admission.stopping.is_set():
            log.warning("alignd: %s again: stopping the %d requests in flight now", name, admission.requests)
            admission.stop()

    async def drain(self, name: str) -> None:
        served = self.app.state.served
        admission, timeout = served.admission, served.settings.shutdown_timeout
        log.info("alignd: %s: draining; %d requests in flight have up to %g s (--shutdown-timeout); "
                 "new requests get 503", name, admission.requests, timeout)
        admission.drain()
        if not await admission.idle(timeout):
            log.warning("alignd: shutdown timeout: stopping the %d requests still in flight", admission.requests)
            admission.stop()
            await admission.idle(GRACE)
        log.info("alignd: drained; stopping the engine")
        self.should_exit = True

    def exit(self, code: int) -> None:
        """End the server now with `code` (the engine died)."""
        self.exit_code = code
        self.should_exit = True


def run(app: FastAPI, settings: ServeSettings) -> int:
    """Serve `app` until a signal or the engine's death; the process's exit code."""
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=GRACE)
    server = Server(config, app)
    app.state.exit = server.exit
    server.run()
    return server.exit_code
