"""Wiring: model + tokenizer + adapters -> registry, engine and app; and uvicorn, blocking or in a thread."""

from __future__ import annotations

import threading
import time
from typing import Any

from qlorakit.errors import ConfigError
from qlorakit.generate.adapters import AdapterSpec
from qlorakit.serve.app import create_app
from qlorakit.serve.config import ServeConfig
from qlorakit.serve.engine import Engine
from qlorakit.serve.metrics import Metrics
from qlorakit.serve.registry import AdapterRegistry


def build_engine(model: Any, tokenizer: Any, base_id: str, base_names: list[str], config: ServeConfig,
                 adapters: list[AdapterSpec] = (), allow_other_base: bool = False) -> Engine:
    """A started engine with every adapter loaded (each checked against the base first)."""
    registry = AdapterRegistry(model, base_id, base_names, allow_other_base)
    for spec in adapters:
        registry.load(registry.check(spec.name, spec.path))
    metrics = Metrics()
    metrics.set("qlorakit_adapters", len(registry.names()))
    return Engine(model, tokenizer, registry, metrics, config.max_batch, config.max_queue).start()


class BackgroundServer:
    """uvicorn serving ``create_app(engine, config)`` from a thread; ``url`` once started, ``close`` to stop."""

    def __init__(self, engine: Engine, config: ServeConfig, log_level: str = "warning") -> None:
        import uvicorn

        self.engine = engine
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine, config), host=config.host, port=config.port,
                                                    log_level=log_level, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="qlorakit-serve-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the server did not start on {config.host}:{config.port}")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"

    def close(self, stop_engine: bool = True) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if stop_engine:
            self.engine.stop()
