"""``ServeConfig``: the limits and the address of ``qlorakit serve``, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from qlorakit.errors import ConfigError

#: The address the server binds when none is given: this machine only.
DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServeConfig:
    """Address, key and limits of the server; every limit is answered with an OpenAI-shaped error."""

    host: str = DEFAULT_HOST
    port: int = 8000  # 0: an ephemeral port (tests)
    api_key: str | None = None  # when set, every /v1 request needs "Authorization: Bearer <key>"
    max_batch: int = 16  # sequences decoded together (16 = quant.gemv.FEW_ROWS: the 4-bit GEMV's few-row path)
    max_queue: int = 64  # requests waiting for a batch slot; one more gets 429
    max_tokens_limit: int = 1024  # most new tokens one request may ask for (max_tokens above it: 400)
    max_prompt_tokens: int = 4096  # a longer prompt gets 413
    max_body_bytes: int = 1 << 20  # a larger request body gets 413
    default_max_tokens: int = 256  # chat requests that give no max_tokens

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: must be in 0..65535 (0 picks a free port)")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty: give a non-empty key, or leave the flag out")
        for name in ("max_batch", "max_queue", "max_tokens_limit", "max_prompt_tokens", "max_body_bytes",
                     "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} = {getattr(self, name)}: must be at least 1")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(f"default_max_tokens {self.default_max_tokens} exceeds max_tokens_limit "
                              f"{self.max_tokens_limit}")


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server reachable from other machines without a key, or ``None``."""
    if api_key is None and host not in (DEFAULT_HOST, "localhost", "::1"):
        return (f"warning: serving on {host} without --api-key: anyone who can reach this machine can use the "
                "models and load adapters from its disk; pass --api-key KEY or bind 127.0.0.1")
    return None
