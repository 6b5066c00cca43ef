"""Support code that tests/ and benchmarks/ share: one of each. Product code never imports it (pyproject's
import contracts, `make lint`), and it never imports tests/.

- `testkit.server`: `bentoml serve` in a subprocess on a free loopback port, stopped by PID; process-tree memory.
- `testkit.tiny_model`: the tiny but real ONNX test model (`python -m testkit.tiny_model` registers it).
- `testkit.model_home`: temporary BentoML homes holding the tiny test model or a copy of a real one.
- `testkit.image_host`: local image hosts on 127.0.0.1 (a Python one that also misbehaves on request, nginx).
- `testkit.images`: small images built in code, hostile ones included (bombs, huge headers, truncations).
- `testkit.photos`: real room photos from the shared data folder, re-encoded at chosen sizes.

Never part of the serving bento or its container image: bentofile.yaml includes only service.py,
serving/ and inference/.
It imports the dev extra's packages (requests, psutil), so it needs `pip install -e ".[dev]"` (`make setup`).
"""
