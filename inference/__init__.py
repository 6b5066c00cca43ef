"""The model kernel: what the service (serving/), bulk jobs (bulk/) and training's evaluation share.

Nothing in this package imports torch: the service image holds ONNX Runtime, not the training stack.

- `decode`: untrusted bytes -> RGB PIL image (`decode_image`), with size/pixel/format limits.
- `preprocess`: RGB image -> normalised float32 CHW array (`preprocess`, `preprocess_batch`), as the model's
  `Preprocessing` says (reduced-scale JPEG decoding included).
- `model`: `OnnxClassifier` (from files or a BentoML model), `ModelContract` (labels, preprocessing, temperature,
  architecture: what training writes and everyone reads) and `ModelInfo` (a stored model: contract, tag, extras).
- `postprocess`: `softmax(logits, temperature)` and per-image `Prediction`s.
- `fetch`: SSRF-safe image download (`fetch_url`, `vet_url`, `UrlPolicy`).
- `errors`: `InputError`/`ServiceError` with stable codes, and their HTTP statuses.
- `config`: the kernel's `RC_*` settings (`KernelConfig`: model tag, decoder limits, URL policy, threshold).

It never imports serving/, training/, bulk/ or service.py (an import-linter contract in pyproject.toml).
"""
