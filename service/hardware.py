"""What the machine offers the forward pass, and the compute dtype `--dtype auto` picks from it.

XLA's CPU backend runs bfloat16 matmuls (bf16 x bf16 -> f32) at about twice float32's speed only where the
CPU has native bfloat16 instructions (AVX512-BF16, AMX-BF16); elsewhere bfloat16 is emulated and no faster
than float32, so there it would cost accuracy for nothing. GPUs and TPUs have native bfloat16.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import jax

# The /proc/cpuinfo flags that decide matmul speed, in the order /info lists them.
MATMUL_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
AUTO = "auto"


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The CPU's model name and its matmul-relevant flags (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {"model": platform.processor() or platform.machine(), "features": []}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():  # the first processor's block says it for all of them
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "features": [flag for flag in MATMUL_FLAGS if flag in flags],
    }


def auto_dtype(backend: str, cpu_features: list[str]) -> str:
    """The dtype `--dtype auto` means on this backend: bfloat16 where the hardware runs it natively."""
    if backend in ("gpu", "cuda", "rocm", "tpu"):
        return "bfloat16"
    return "bfloat16" if NATIVE_BF16_FLAGS & set(cpu_features) else "float32"


@functools.cache
def describe() -> dict:
    """/info's `hardware`: the JAX backend and its devices, the CPU, and what `auto` resolves to here."""
    backend = jax.default_backend()
    cpu = cpu_info()
    return {
        "backend": backend,
        "devices": [device.device_kind for device in jax.devices()],
        "cpu": cpu,
        "auto_dtype": auto_dtype(backend, cpu["features"]),
    }


def resolve_dtype(dtype: str) -> str:
    """`dtype` with `auto` replaced by what this machine runs fastest without losing more than bfloat16 does."""
    return describe()["auto_dtype"] if dtype == AUTO else dtype
