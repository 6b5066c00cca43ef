"""The HTTP service around the model kernel (inference/): only service.py imports it.

- `config`: every `RC_*` setting of the service (`ServiceConfig`: the kernel's plus workers, batching, ...).
- `batching`: `GreedyBatcher`, the model process's adaptive batcher.
- `http_guards`: ASGI middlewares (error envelope, load shedding, request body guard, API keys at the door).
- `api_keys`: API key hashes, rate limits and daily quotas (`python -m serving.api_keys`).
- `metrics`: Prometheus stage timers (`rc_stage_seconds`, `rc_batch_size`).
- `web`: the web page (`static/`) and the API docs page.
"""
