"""Serving-time code shared by the service and by training's evaluation of the exported model.

Nothing in this package imports torch: the service image holds ONNX Runtime, not the training stack.

- `decode`: untrusted bytes -> RGB PIL image (`decode_image`), with size/pixel/format limits.
- `preprocess`: RGB image -> normalised float32 CHW array (`preprocess`, `preprocess_batch`).
- `model`: `OnnxClassifier` (from files or a BentoML model) and `ModelInfo` (the model's metadata).
- `postprocess`: `softmax(logits, temperature)` and per-image `Prediction`s.
- `fetch`: SSRF-safe image download (`fetch_url`, `vet_url`, `UrlPolicy`).
- `errors`: `InputError`/`ServiceError` with stable codes, and their HTTP statuses.
- `config`: the service's `RC_*` settings (`ServiceConfig`).
- `http_guards`: ASGI middlewares (error envelope, load shedding, request body guard).
"""
