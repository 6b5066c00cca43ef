"""Support code that tests/ and benchmarks/ (and bulk.benchmark) share: one of each.

- `testkit.server`: `bentoml serve` in a subprocess on a free loopback port, stopped by PID; process-tree memory.
- `testkit.model_home`: temporary BentoML homes holding the tiny test model or a copy of a real one.
- `testkit.image_host`: local image hosts on 127.0.0.1 (a Python one that also misbehaves on request, nginx).
- `testkit.images`: small images built in code, hostile ones included (bombs, huge headers, truncations).
- `testkit.photos`: real room photos from the shared data folder, re-encoded at chosen sizes.

Never part of the serving bento or its container image: bentofile.yaml includes only service.py and inference/.
It imports the dev extra's packages (requests, psutil), so it needs `pip install -e ".[dev]"` (`make setup`).
"""
