"""The frozen base model's dtype: what ``--dtype auto`` picks on this machine, and why.

bf16 halves the bytes every matrix product reads and, where the hardware executes it natively,
runs those products several times faster than fp32 (AMX on a Sapphire Rapids-class Xeon: 6.9x
on a 512x576 @ 576x1536 product). Where bf16 is only emulated (AVX2-only CPUs, CUDA devices
before Ampere) it is slower than fp32. So ``auto`` resolves to:

* ``bfloat16`` on a CPU whose flags include ``amx_bf16`` or ``avx512_bf16``;
* ``bfloat16`` on a CUDA device that supports bf16 natively (``torch.cuda.is_bf16_supported``);
* ``float32`` everywhere else (other CPUs, MPS, other devices).

An explicit dtype always wins. Only the frozen model's weights and activations change: the
prompt, its optimizer state, the loss and the label softmax stay fp32, and so do checkpoints.

Torch is imported only to ask CUDA, so the CLI can import this module while it builds its parser.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AUTO",
    "BF16_FLAGS",
    "CPUINFO_ENV",
    "CpuInfo",
    "DtypeChoice",
    "native_bf16_cpu",
    "parse_cpuinfo",
    "read_cpuinfo",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)

AUTO = "auto"
CPUINFO = Path("/proc/cpuinfo")
# A file read instead of /proc/cpuinfo (inherited by subprocesses): the test suite points it at
# a CPU without bf16, so that its numbers are the same on every machine.
CPUINFO_ENV = "SOFTPROMPT_CPUINFO"
# Either flag means the CPU computes bf16 products in hardware (AMX tiles, or AVX-512 dot products).
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# The flags a reason names: what the CPU has on the way to native bf16, so a reader sees why.
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")

_logged: set[tuple[str, str, str]] = set()  # choices already logged by this process


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name and feature flags (as ``/proc/cpuinfo`` lists them)."""

    model: str
    flags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype the frozen model runs in, and why.

    Attributes:
        dtype: a torch dtype name (``"bfloat16"``, ``"float32"``, ...), never ``"auto"``.
        reason: one readable sentence naming the request, the CPU model, the flags seen and the
            device.
        cpu_model: the CPU's model name.
        flags_seen: the CPU's flags among :data:`REPORTED_FLAGS`, in that order.
        device: the device the choice was made for (``"cpu"``, ``"cuda:0"``, ...).
    """

    dtype: str
    reason: str
    cpu_model: str
    flags_seen: list[str] = field(default_factory=list)
    device: str = "cpu"

    def report_fields(self) -> dict[str, str]:
        """``dtype``, ``dtype_reason``, ``cpu_model``: the fields of ``report.json`` and benches."""
        return {"dtype": self.dtype, "dtype_reason": self.reason, "cpu_model": self.cpu_model}


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags in ``/proc/cpuinfo`` text.

    x86 lists ``model name`` and ``flags``; Arm lists ``Features`` (and often no model name).
    """
    model, flags = "", ""
    for line in text.splitlines():
        key, separator, value = line.partition(":")
        if not separator:
            continue
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = value
    return CpuInfo(model or _platform_cpu(), frozenset(flags.split()))


def read_cpuinfo(path: str | Path | None = None) -> CpuInfo:
    """The CPU's model and flags, read from a ``/proc/cpuinfo``-format file.

    Args:
        path: the file; default ``$SOFTPROMPT_CPUINFO`` if set, else ``/proc/cpuinfo``. Without
            it (macOS, Windows) the model comes from :mod:`platform` and no flags are known, so
            ``auto`` stays fp32 there.
    """
    try:
        text = Path(path or os.environ.get(CPUINFO_ENV) or CPUINFO).read_text(
            encoding="utf-8", errors="replace"
        )
    except OSError:
        return CpuInfo(_platform_cpu())
    return parse_cpuinfo(text)


def _platform_cpu() -> str:
    return platform.processor() or platform.machine() or "unknown CPU"


def native_bf16_cpu(flags: Iterable[str]) -> bool:
    """Whether a CPU with these flags computes bf16 in hardware (:data:`BF16_FLAGS`)."""
    return not set(BF16_FLAGS).isdisjoint(flags)


def resolve_dtype(requested: str, device: Any = "cpu", cpu: CpuInfo | None = None) -> DtypeChoice:
    """The dtype to load the frozen model in: ``requested``, or the hardware's choice for ``auto``.

    Each distinct choice is logged once per process (INFO).

    Args:
        requested: ``"auto"``, or a dtype name (``"float32"``, ``"bfloat16"``, ...), which wins.
        device: where the model runs (``"cpu"``, ``"cuda:0"``, a ``torch.device``); resolve
            ``--device auto`` first.
        cpu: the CPU's facts (default: :func:`read_cpuinfo`).

    Returns:
        DtypeChoice: the dtype name and its reason.

    Raises:
        ValueError: ``requested`` is not a non-empty string.
    """
    if not isinstance(requested, str) or not requested.strip():
        raise ValueError(f"dtype={requested!r} is not valid; use 'auto' or a dtype name")
    cpu = cpu if cpu is not None else read_cpuinfo()
    device_name = str(device)
    seen = [flag for flag in REPORTED_FLAGS if flag in cpu.flags]
    flags = ", ".join(seen) or "none of " + ", ".join(REPORTED_FLAGS)
    facts = f"CPU {cpu.model} (flags seen: {flags})"
    if requested != AUTO:
        dtype, why = requested, f"{requested} requested explicitly (it wins over auto)"
    else:
        dtype, why = _auto(device_name, cpu)
    reason = f"{why}; {facts}; device {device_name}"
    choice = DtypeChoice(dtype, reason, cpu.model, seen, device_name)
    key = (choice.dtype, choice.device, choice.reason)
    if key not in _logged:
        _logged.add(key)
        logger.info("base model dtype %s: %s", choice.dtype, choice.reason)
    return choice


def _auto(device: str, cpu: CpuInfo) -> tuple[str, str]:
    """``auto``'s dtype on ``device`` and the start of its reason."""
    kind = device.partition(":")[0]
    if kind == "cpu":
        if native_bf16_cpu(cpu.flags):
            return "bfloat16", "auto: bfloat16, since the CPU executes bf16 natively"
        return "float32", f"auto: float32, since the CPU lacks {' and '.join(BF16_FLAGS)}"
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "float32", "auto: float32, since no CUDA device is available"
        if _cuda_native_bf16():
            return "bfloat16", "auto: bfloat16, since the CUDA device supports bf16 natively"
        return "float32", "auto: float32, since the CUDA device has no native bf16"
    return "float32", f"auto: float32, since bf16 is chosen only on CPUs and CUDA, not {kind}"


def _cuda_native_bf16() -> bool:
    """Whether the current CUDA device computes bf16 in hardware (Ampere or newer)."""
    import torch

    try:  # torch >= 2.3 also reports emulated bf16 unless told not to
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch reports native support only
        return bool(torch.cuda.is_bf16_supported())
