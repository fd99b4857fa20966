"""Running the app under uvicorn: in the foreground (``compactvl serve``; Ctrl-C / SIGTERM stop accepting, finish the
requests in flight and the queued ones, then exit) or on a background thread (:class:`ServerThread`: tests,
notebooks)."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ..errors import ConfigError
from ..model import CompactVLM
from ..variants import load_model  # noqa: F401 - compactvl.serve.load_model, shared with compactvl ui
from .app import build_app
from .settings import ServeSettings


def serve(model: CompactVLM, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          graceful_timeout: float | None = 60.0, log_level: str = "info") -> None:
    """Serve ``model`` until interrupted."""
    config = uvicorn.Config(build_app(model, settings), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=graceful_timeout)
    uvicorn.Server(config).run()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """``with ServerThread(model, settings) as srv:`` — the app on ``srv.url`` (``http://127.0.0.1:PORT``) until the
    block ends; ``srv.stop()`` is the graceful shutdown (in-flight requests finish)."""

    def __init__(self, model: CompactVLM, settings: ServeSettings, host: str = "127.0.0.1", port: int | None = None):
        self.app = build_app(model, settings)
        self.engine = self.app.state.engine
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(self.app, host=host, port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="compactvl-serve", daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the server did not start on {self.url} within {timeout:g} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
