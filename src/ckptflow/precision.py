"""Which floating-point precision a run trains in: fp32, bf16 or fp16 (HF's `bf16` / `fp16` switches).

`auto` (the default of both switches) is what TRL's `SFTConfig` picks — bf16 mixed precision
(`bf16 = not fp16`) — wherever the hardware runs bf16 natively: a CUDA GPU that supports it
(Ampere or later), a CPU with bf16 instructions (avx512_bf16, AMX, Arm bf16). A GPU without bf16
(where TRL's default fails) gets fp16; a CPU without bf16, where TRL would emulate bf16 more slowly
than fp32, stays in fp32. The kernel's CPU flags answer on a Linux x86 machine without a GPU;
elsewhere only torch is asked (not transformers or TRL). The answer is cached per process.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Precision = Literal["fp32", "bf16", "fp16"]
# A switch as the settings hold it: on, off, or `auto` (resolved here).
Switch = bool | Literal["auto"]
AUTO = "auto"
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Hardware:
    """What the trainer will run on (training.sft_config trains on CUDA when there is one, else on the CPU)."""

    cuda: bool
    bf16: bool  # the device runs bf16 natively
    name: str  # for messages: "CUDA GPU <name>" / "CPU (<capability>)"


def resolve(bf16: Switch, fp16: Switch, hardware: Hardware | None = None) -> Precision:
    """The precision the switches mean on `hardware` (default: this machine).

    An explicit `true` wins over `auto` on the other switch (both `true` is refused by the
    settings). `auto` asks the hardware only when no explicit switch decides.
    """
    if bf16 is True:
        return "bf16"
    if fp16 is True:
        return "fp16"
    if bf16 is False and fp16 is False:
        return "fp32"
    hw = hardware or this_machine()
    if bf16 == AUTO and hw.bf16:
        return "bf16"
    # fp16 only where bf16 is not native: on a CUDA GPU (CPUs have no fp16 mixed precision in HF).
    if fp16 == AUTO and hw.cuda and not hw.bf16:
        return "fp16"
    return "fp32"


@functools.cache
def this_machine() -> Hardware:
    """The training device of this process: the first CUDA GPU if there is one, else the CPU.

    On a Linux x86 machine with no GPU device the kernel's CPU flags answer (the same answer in
    every process, with or without torch imported, so the fingerprint does not depend on which
    command asks: `ckptflow run` of a completed run answers without importing torch); elsewhere torch.
    """
    known = _linux_x86_cpu_only()
    if known is not None:
        return known
    import torch

    if torch.cuda.is_available():
        return Hardware(cuda=True, bf16=bool(torch.cuda.is_bf16_supported()), name=f"CUDA GPU {torch.cuda.get_device_name(0)}")
    return Hardware(cuda=False, bf16=_cpu_has_bf16(torch), name=f"CPU ({torch.backends.cpu.get_cpu_capability()})")


# Device nodes of GPU drivers (NVIDIA, AMD ROCm): with any of them present, torch decides.
_GPU_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd", "/proc/driver/nvidia")
# /proc/cpuinfo flags of native bf16 on x86 (what torch's avx512_bf16 / AMX probes look for).
_X86_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def _linux_x86_cpu_only() -> Hardware | None:
    """The CPU from /proc/cpuinfo on a Linux x86 machine without a GPU device; None when unsure."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if any(os.path.exists(node) for node in _GPU_DEVICE_NODES):
        return None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return None
    native = sorted(_X86_BF16_FLAGS.intersection(flags))
    return Hardware(cuda=False, bf16=bool(native), name=f"CPU ({', '.join(native) or 'no native bf16'})")


def _cpu_has_bf16(torch) -> bool:
    # torch's own CPU feature probes (private, so each is optional): x86 avx512_bf16 / AMX; on Arm, oneDNN's check.
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        supported = getattr(torch.cpu, probe, None)
        if supported is not None and supported():
            return True
    if platform.machine().lower() in ("aarch64", "arm64"):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def check_supported(precision: Precision, hardware: Hardware | None = None) -> None:
    """Refuse a precision the training device cannot run (ConfigError, exit 2): HF would fail or, for fp16
    on a CPU, silently train in fp32 under a fingerprint that says fp16."""
    from ckptflow.errors import ConfigError

    hw = hardware or this_machine()
    if precision == "fp16" and not hw.cuda:
        raise ConfigError(
            f"fp16 mixed precision needs a CUDA GPU, and this machine trains on the {hw.name}: "
            "set CKPTFLOW_TRAIN__FP16=false (or auto; CKPTFLOW_TRAIN__BF16=auto picks bf16 where the CPU has it)"
        )
    if precision == "bf16" and hw.cuda and not hw.bf16:
        raise ConfigError(
            f"bf16 is not supported by the {hw.name} (it needs Ampere or later): "
            "set CKPTFLOW_TRAIN__BF16=auto (fp16 on this GPU) or false (fp32)"
        )
