"""`python -m bulk --explain`: a local Ray job (started and stopped by the job, on 127.0.0.1) writes the top
class's heatmap grid and its crop box as list columns; the grids are the service's own; a model without
activation maps and a CSV result file are refused with exit 2 before any Ray process starts."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from inference.preprocess import Preprocessing, crop_box
from testkit.model_home import TinyModel, register_tiny_model_in
from testkit.server import REPO_ROOT
from tests.test_bulk import ProcessWatch, bulk_command, job_env, run_bulk, wait_gone
from tests.test_service_explain import hottest_cell, marked_photo


@pytest.fixture(scope="module")
def explainable_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return register_tiny_model_in(tmp_path_factory.mktemp("bentoml_home_bulk_explain"), explainable=True)


def test_explain_writes_each_rows_grid_and_crop_box(explainable_model: TinyModel, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    cells = {(640, 480): (1, 5), (1600, 1200): (6, 2)}
    for size, cell in cells.items():
        marked_photo(size, cell, folder)
    (folder / "broken.jpg").write_bytes(b"not an image")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc-ray-explain-"))
    out = tmp_path / "explained.parquet"
    env = job_env(explainable_model, RAY_TMPDIR=str(ray_tmp))
    try:
        with ProcessWatch(set()) as watch:
            summary = run_bulk(bulk_command(folder, out, "--explain"), env, watch)
        assert not wait_gone(watch.pids)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert summary["ok"] == 2 and summary["errors"] == {"not_an_image": 1}
    table = pq.read_table(out)
    assert table.schema.field("heatmap").type.value_type.value_type.bit_width == 32  # list<list<float32>>
    rows = {Path(row["input"]).name: row for row in table.to_pylist()}
    for size, cell in cells.items():
        row = rows[f"marked_{size[0]}x{size[1]}_{cell[0]}_{cell[1]}.jpg"]
        assert row["class"] == "bedroom" and np.asarray(row["heatmap"]).shape == (7, 7)
        assert hottest_cell(row["heatmap"]) == cell
        assert row["heatmap_crop_box"] == pytest.approx(list(crop_box(*size, Preprocessing())), abs=0.05)
    assert rows["broken.jpg"]["heatmap"] is None and rows["broken.jpg"]["error_code"] == "not_an_image"


@pytest.mark.parametrize("case", ["model without maps", "csv"])
def test_explain_is_refused_with_exit_2_when_it_cannot_be_done(case: str, tiny_model: TinyModel,
                                                               explainable_model: TinyModel, tmp_path: Path) -> None:
    model = tiny_model if case == "model without maps" else explainable_model
    out = tmp_path / ("results.parquet" if case == "model without maps" else "results.csv")
    result = subprocess.run(bulk_command(tmp_path, out, "--explain"), cwd=REPO_ROOT, env=job_env(model),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert ("cannot explain" if case == "model without maps" else "CSV") in result.stderr
    assert "Traceback" not in result.stderr
