"""`--dtype auto` and /info's `hardware`: the CPU's matmul features read from /proc/cpuinfo, bfloat16 chosen
only where the hardware runs it natively, and a model configured `auto` really computing in that dtype."""

from __future__ import annotations

import jax
import pytest
from fastapi.testclient import TestClient
from flax.traverse_util import flatten_dict

from service import hardware
from service.app import create_app
from service.models import configured_models
from service.settings import Settings
from tests.service.support import SHALLOW, SMALL_GRID, models_file_runtime

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile

processor\t: 1
model name\t: some other core
flags\t\t: fpu sse2
"""


def test_cpu_info_reads_the_first_processors_model_and_matmul_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    info = hardware.cpu_info(path)
    assert info["model"] == "AMD EPYC 9R14 96-Core Processor"
    assert info["features"] == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"]


def test_cpu_info_without_proc_cpuinfo_lists_no_features(tmp_path):
    assert hardware.cpu_info(tmp_path / "missing")["features"] == []


@pytest.mark.parametrize(
    ("backend", "features", "expected"),
    [
        ("cpu", ["avx2", "avx512f", "avx512_bf16"], "bfloat16"),  # Zen 4, Cooper Lake
        ("cpu", ["avx2", "avx512f", "amx_tile", "amx_bf16"], "bfloat16"),  # Sapphire Rapids
        ("cpu", ["avx2", "fma", "avx512f", "avx512_vnni"], "float32"),  # Skylake-SP, Ice Lake: emulated bf16
        ("cpu", [], "float32"),
        ("gpu", [], "bfloat16"),
        ("tpu", [], "bfloat16"),
    ],
)
def test_auto_is_bfloat16_only_where_the_hardware_runs_it_natively(backend, features, expected):
    assert hardware.auto_dtype(backend, features) == expected


@pytest.fixture
def two_classifiers(tmp_path, make_repo):
    repo = make_repo("sequence-classification", seed=3, **SHALLOW)[0]
    path = tmp_path / "models.toml"
    path.write_text(
        f'[models.fixed]\nsource = "{repo}"\ndtype = "float32"\n\n'
        f'[models.chosen]\nsource = "{repo}"\ndtype = "auto"\n'
    )
    return path


@pytest.mark.parametrize("native", ["bfloat16", "float32"])
def test_auto_resolves_to_the_machines_dtype_and_explicit_dtypes_stay(monkeypatch, two_classifiers, native):
    monkeypatch.setattr(hardware, "describe", lambda: {"auto_dtype": native})
    specs = {s.name: s for s in configured_models(Settings(models_file=str(two_classifiers), dtype="auto"))}
    assert (specs["fixed"].dtype, specs["chosen"].dtype) == ("float32", native)
    short_form = configured_models(Settings(models=f"other={specs['fixed'].source}", dtype="auto"))
    assert [s.dtype for s in short_form] == [native]


def test_info_reports_the_hardware_and_an_auto_model_computes_in_its_dtype(two_classifiers):
    runtime = models_file_runtime(two_classifiers, **SMALL_GRID)
    try:
        assert not runtime.failed, runtime.failed
        with TestClient(create_app(runtime.settings, runtime=runtime, start_runtime=False)) as client:
            info = client.get("/info").json()
        described = info["hardware"]
        assert described["backend"] == jax.default_backend()
        assert described["cpu"]["features"] == hardware.cpu_info()["features"]
        native = hardware.auto_dtype(jax.default_backend(), hardware.cpu_info()["features"])
        assert described["auto_dtype"] == native
        assert info["models"]["chosen"]["dtype"] == native
        assert info["models"]["fixed"]["dtype"] == "float32"
        # The runners' own matmul weights, not the configuration echoed back.
        for name, dtype in (("chosen", native), ("fixed", "float32")):
            params = flatten_dict(runtime.models[name].runner.params)
            kernels = {p: v for p, v in params.items() if p[-1] == "kernel"}
            assert kernels and {v.dtype.name for v in kernels.values()} == {dtype}, name
    finally:
        runtime.stop()
