"""Running the app under uvicorn: in the foreground (`leapllm serve`) or in a background thread (tests).

The listening socket is bound before anything else, so that a port already in use is a one-line
error before the model loads, not a uvicorn traceback after; `port=0` picks a free port.

On SIGTERM or Ctrl-C uvicorn stops accepting connections and waits for the requests in flight.
At the same moment `on_shutdown` (the app's `drain`) tells the engine to refuse new requests,
give running ones the grace period and abort the rest, so every client gets a complete answer or
a clean OpenAI error (503), never a cut connection. uvicorn's own timeout, a little longer, is the
last resort: it cancels whatever is still running. Then the process exits 0: unlike plain uvicorn
we do not re-raise the captured signal afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
import threading
import time

import uvicorn

from leapllm.errors import LeapLLMError


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening. Raises LeapLLMError if that fails."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise LeapLLMError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart right away; TIME_WAIT only
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise LeapLLMError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_shutdown=None):
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets=None) -> None:
        drain = asyncio.ensure_future(self.on_shutdown()) if self.on_shutdown is not None else None
        await super().shutdown(sockets)  # waits for the requests in flight, which the drain ends
        if drain is not None:
            await drain

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own version re-raises SIGTERM after the graceful shutdown, which kills the process
        # with that signal instead of exiting 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def make_server(app, *, on_shutdown=None, log_level: str = "info", access_log: bool = True,
                timeout_graceful_shutdown: float | None = 30.0) -> Server:
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=timeout_graceful_shutdown)
    return Server(config, on_shutdown)


def serve(app, sock: socket.socket, **kwargs) -> bool:
    """Serve until SIGTERM / SIGINT; True if the server started (False: the app failed to start)."""
    server = make_server(app, **kwargs)
    asyncio.run(server.serve(sockets=[sock]))
    return server.started


class ServerThread:
    """The app served on 127.0.0.1 in a background thread, for tests and benchmarks.

        with ServerThread(app) as server:
            httpx.get(f"{server.url}/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **kwargs):
        kwargs.setdefault("on_shutdown", getattr(app.state, "drain", None))
        kwargs.setdefault("log_level", "warning")
        kwargs.setdefault("access_log", False)
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = make_server(app, **kwargs)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                       name="leapllm-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
