"""Temporary BentoML homes holding a `room_classifier` model, so tests, load runs and container builds never
touch the developer's own model store.

BentoML fixes its home when it is imported, so models are registered by a subprocess that gets BENTOML_HOME
in its environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testkit.server import REPO_ROOT

if TYPE_CHECKING:
    from inference.model import ModelInfo

MODEL_NAME = "room_classifier"


@dataclass(frozen=True)
class TinyModel:
    """The tiny but real ONNX test model (testkit/tiny_model.py) as registered in `home`."""

    home: Path
    tag: str
    onnx_path: Path
    metadata: dict[str, Any]

    @property
    def info(self) -> "ModelInfo":
        """Its metadata read as the service reads it (imported here: onnxruntime is not needed to register)."""
        from inference.model import ModelInfo

        return ModelInfo.from_metadata(self.tag, self.metadata)


def run_with_home(home: Path | str, args: list[str], timeout_s: float | None = None) -> str:
    """Run `python args...` from the repo root with BENTOML_HOME=home; return stdout, raise with stderr."""
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (BENTOML_HOME={home}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def register_tiny_model_in(home: Path | str, with_other: bool = False, explainable: bool = False,
                           jpeg_draft: bool = True) -> TinyModel:
    """Save the tiny test model into `home` (from a subprocess: this process's bentoml config is untouched);
    `with_other`: the five-label variant that answers `other` for white images; `explainable`: the variant with
    activation maps; `jpeg_draft=False`: a preprocessing that decodes large JPEGs at full scale."""
    args = (["-m", "testkit.tiny_model", "--json"] + (["--with-other"] if with_other else [])
            + (["--explainable"] if explainable else []) + ([] if jpeg_draft else ["--no-jpeg-draft"]))
    data = json.loads(run_with_home(home, args, timeout_s=120).strip().splitlines()[-1])
    return TinyModel(home=Path(home), tag=data["tag"], onnx_path=Path(data["path"]) / "model.onnx",
                     metadata=data["metadata"])


def copy_model(source_home: Path | str, tag: str, target_home: Path | str) -> str:
    """Copy model `tag` from one BentoML home to another via `bentoml models export/import`; return its tag."""
    with tempfile.TemporaryDirectory(prefix="rc-model-") as scratch:
        archive = Path(scratch) / "model.bentomodel"
        run_with_home(source_home, ["-m", "bentoml", "models", "export", tag, str(archive)])
        run_with_home(target_home, ["-m", "bentoml", "models", "import", str(archive)])
    code = f"import bentoml; print(bentoml.models.get({tag!r}).tag)"
    return run_with_home(source_home, ["-c", code]).strip().splitlines()[-1]


@contextmanager
def temporary_model_home(source_home: str | None = None, tag: str = f"{MODEL_NAME}:latest") -> Iterator[str]:
    """A fresh BentoML home with one room_classifier: copied from `source_home` if given, else the tiny model."""
    home = tempfile.mkdtemp(prefix="rc-bentoml-home-")
    try:
        if source_home:
            copy_model(source_home, tag, home)
        else:
            register_tiny_model_in(home)
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)
