"""``qlorakit serve``: an OpenAI-compatible HTTP server for one 4-bit base and any number of LoRA adapters.

``app`` (FastAPI routes in OpenAI's wire format, limits, errors, key), ``schemas`` (the request bodies,
pydantic), ``protocol`` (answers and the error body), ``engine`` (the decoding thread: continuous batching
across adapters over ``generate.batched.BatchDecoder``), ``registry`` (model names, adapter hot-load and
delete), ``metrics`` (Prometheus text), ``text`` (stop strings), ``config`` (``ServeConfig``), ``runner``
(wiring and uvicorn). Needs the ``serve`` extra (fastapi, uvicorn); only ``cli`` imports this package.
"""
