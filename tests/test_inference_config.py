"""The RC_* declarations (the kernel's in inference/config.py, the service's in serving/config.py): how variables
are read, and the docs generated from them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from inference.config import KernelConfig
from serving.config import ServiceConfig, settings_table

REPO = Path(__file__).resolve().parents[1]
README_BEGIN = "<!-- rc-settings:begin"
README_END = "<!-- rc-settings:end -->"


def readme_settings_block() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(README_BEGIN)
    start = text.index("\n", start) + 1  # the table starts on the line after the marker
    return text[start:text.index(README_END, start)]


def test_readme_table_is_the_generated_one() -> None:
    assert readme_settings_block() == settings_table(), (
        "README.md's RC_* table differs from serving/config.py: paste the output of `python -m serving.config` "
        "between the rc-settings markers")


def test_module_prints_the_table() -> None:
    out = subprocess.run([sys.executable, "-m", "serving.config"], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout == settings_table()


def test_every_setting_is_documented_with_its_bounds() -> None:
    rows = settings_table().splitlines()[2:]
    assert len(rows) == len(ServiceConfig.model_fields)
    for row in rows:
        name, default, allowed, meaning = (cell.strip() for cell in row.strip("|").split(" | "))
        assert name.startswith("RC_") and default and allowed and meaning, row
    assert "| RC_UNCERTAIN_THRESHOLD | 0.5 | number >= 0, <= 1 |" in settings_table()
    assert "| RC_ORT_THREADS | half the cores | integer >= 1 |" in settings_table()


def test_the_constructor_is_the_defaults_and_from_env_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RC_WORKERS", "5")
    monkeypatch.setenv("RC_IMAGE_FORMATS", "JPEG")
    assert (ServiceConfig().workers, ServiceConfig().image_formats) == (1, ("JPEG", "PNG", "WEBP", "GIF"))
    assert (ServiceConfig.from_env().workers, ServiceConfig.from_env().image_formats) == (5, ("JPEG",))
    assert ServiceConfig.from_env({}).workers == 1  # a given mapping is all that is read


def test_the_kernel_settings_are_the_services_with_the_same_defaults() -> None:
    """Training and bulk read KernelConfig, the service ServiceConfig: one declaration, so they cannot drift."""
    kernel, service = KernelConfig(), ServiceConfig()
    assert set(KernelConfig.model_fields) < set(ServiceConfig.model_fields)
    assert all(getattr(kernel, name) == getattr(service, name) for name in KernelConfig.model_fields)
    assert (kernel.image_limits(), kernel.url_policy()) == (service.image_limits(), service.url_policy())


def test_the_kernel_reads_its_own_variables_and_leaves_the_servers_alone() -> None:
    config = KernelConfig.from_env({"RC_MAX_PIXELS": "500", "RC_WORKERS": "0", "RC_MAX_BATCH_SIZE": "oops"})
    assert config.max_pixels == 500 and not hasattr(config, "workers")
    with pytest.raises(ValueError, match=r"RC_MAX_PIXELS='ok'"):
        KernelConfig.from_env({"RC_MAX_PIXELS": "ok"})


@pytest.mark.parametrize("spelling, value", [("1", True), ("yes", True), ("ON", True), ("true", True),
                                             ("0", False), ("no", False), ("off", False), ("False", False)])
def test_booleans_read_the_usual_spellings(spelling: str, value: bool) -> None:
    assert ServiceConfig.from_env({"RC_URL_FETCH": spelling}).url_fetch is value


@pytest.mark.parametrize("config_class", [KernelConfig, ServiceConfig])
def test_rc_jpeg_draft_is_refused_saying_it_is_the_models_preprocessing_now(config_class: type[KernelConfig]) -> None:
    """A server setting must not change the pixels a model sees; a deployment still setting it learns why."""
    assert "jpeg_draft" not in config_class.model_fields
    for name in ("RC_JPEG_DRAFT", "rc_jpeg_draft"):
        with pytest.raises(ValueError, match=rf"{name}='false': .*part of the model's preprocessing"):
            config_class.from_env({name: "false", "RC_WORKERS": "2"})
    assert config_class.from_env({"RC_JPEG_DRAFT": " "}).max_pixels == 40_000_000  # blank is unset, as everywhere


def test_blank_values_keep_the_default_and_values_are_stripped() -> None:
    config = ServiceConfig.from_env({"RC_MAX_QUEUED": "  ", "RC_WORKERS": " 2 ", "RC_URL_ALLOWLIST": ""})
    assert (config.max_queued, config.workers, config.url_allowlist) == (64, 2, ())


def test_settings_are_frozen_and_reach_the_limits_they_feed() -> None:
    config = ServiceConfig.from_env({"RC_MAX_IMAGE_BYTES": "1000", "RC_MAX_PIXELS": "500", "RC_IMAGE_FORMATS": "png",
                                     "RC_FETCH_TOTAL_TIMEOUT_S": "2.5", "RC_FETCH_MAX_REDIRECTS": "0",
                                     "RC_URL_ALLOWLIST": "cdn.internal,10.0.0.0/8"})
    with pytest.raises(ValidationError):
        config.max_pixels = 1  # type: ignore[misc]
    limits, policy = config.image_limits(), config.url_policy()
    assert (limits.max_bytes, limits.max_pixels, limits.formats) == (1000, 500, ("PNG",))
    assert (policy.total_timeout_s, policy.max_redirects, policy.max_bytes) == (2.5, 0, 1000)
    assert policy.allow_hosts == frozenset({"cdn.internal"})
    assert [str(network) for network in policy.allow_networks] == ["10.0.0.0/8"]


def test_every_bad_variable_is_named_at_once() -> None:
    with pytest.raises(ValueError) as caught:
        ServiceConfig.from_env({"RC_WORKERS": "0", "RC_FETCH_READ_TIMEOUT_S": "-1", "RC_MAX_PIXELS": "ok"})
    message = str(caught.value)
    assert all(name in message for name in ("RC_WORKERS='0'", "RC_FETCH_READ_TIMEOUT_S='-1'", "RC_MAX_PIXELS='ok'"))


def write_cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, cores", [
    ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2, 1.5 CPUs: two threads may run at once
    ({"cpu.max": "100000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
])
def test_a_cpu_limit_caps_the_cores(tmp_path: Path, files: dict[str, str], cores: int) -> None:
    from serving.config import available_cores

    assert available_cores(write_cgroup(tmp_path, files)) == min(cores, len(os.sched_getaffinity(0)))


@pytest.mark.parametrize("files", [{}, {"cpu.max": "max 100000\n"}, {"cpu/cpu.cfs_quota_us": "-1\n",
                                                                       "cpu/cpu.cfs_period_us": "100000\n"}])
def test_no_cpu_limit_leaves_the_affinity(tmp_path: Path, files: dict[str, str]) -> None:
    from serving.config import available_cores, cgroup_cpu_quota

    assert cgroup_cpu_quota(write_cgroup(tmp_path, files)) is None
    assert available_cores(tmp_path) == len(os.sched_getaffinity(0))
