"""Training precision: what a training stage's `precision` (auto, fp32, bf16) means on this machine, and how a
training step runs in it.

- On a GPU, bf16 is DeepSpeed's bf16 mode (bf16 weights, fp32 master copies in its optimizer), as before.
- On a CPU, bf16 is torch.autocast(cpu, bf16) around the forward, over fp32 weights, gradients and
  optimizer (DeepSpeed's bf16 mode off). DeepSpeed's bf16 mode casts the parameters but not BatchNorm's
  running statistics, so the conv stem failed ("expected scalar type BFloat16 but found Float"); and
  autocast leaves the ops that want fp32 (softmax, norms, losses) in fp32. The model computes the
  attention itself in fp32 under CPU autocast and runs the conv stem channels_last (pipeline/model/multiway.py).
- `auto`: bf16 on a GPU; on a CPU bf16 where it has bf16 instructions (AMX-BF16, AVX512-BF16), which
  oneDNN's bf16 matmuls and convolutions use (#30 measured AMX's bf16 matmul at 6.5x fp32's); fp32
  elsewhere, where bf16 has no instructions of its own to gain from.

Measured (BENCHMARKS.md, "Training precision"; bench/train.py): on a 2-core AVX512-BF16 CPU vlp's demo step
in bf16 is 1.4-1.6x its fp32 step; loss curves within the gap between two fp32 seeds (tests/test_precision.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Precision:
    """The precision a training runs in, and why it was chosen."""
    name: str
    """"fp32" or "bf16"."""
    device: str
    """"cpu" or "cuda"."""
    reason: str

    @property
    def deepspeed_bf16(self) -> bool:
        """bf16 weights in DeepSpeed's bf16 mode: on a GPU only (see the module docstring)."""
        return self.name == "bf16" and self.device == "cuda"

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype of the images a step feeds the model (bf16 weights take bf16 images)."""
        return torch.bfloat16 if self.deepspeed_bf16 else torch.float32

    def autocast(self, managed_by_deepspeed: bool = True) -> contextlib.AbstractContextManager:
        """The context a forward runs in: bf16 autocast over fp32 weights, where the weights are not bf16
        already. `managed_by_deepspeed`: a DeepSpeed engine (bf16 weights on a GPU); a plain torch loop
        (the CapFilt fine-tunes) passes False and autocasts on a GPU too."""
        if self.name != "bf16" or (managed_by_deepspeed and self.deepspeed_bf16):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=torch.bfloat16)

    def to_json(self) -> dict:
        return {"precision": self.name, "precision_reason": self.reason}


def cpu_bf16_instructions() -> str | None:
    """This CPU's bf16 instructions, the faster first ("AMX-BF16", "AVX512-BF16"), or None. torch's own
    probes (oneDNN's cpuinfo) where it has them, else the kernel's flags in /proc/cpuinfo."""
    # torch probes AMX's tiles; every CPU with them (Sapphire Rapids and later) has AMX-BF16 too
    probes = {"AMX-BF16": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}
    flags = _cpuinfo_flags()
    for name, probe in probes.items():
        check = getattr(torch.cpu, probe, None)
        try:
            found = bool(check()) if check is not None else None
        except RuntimeError:
            found = None
        if found is None:
            found = name.lower().replace("-", "_") in flags
        if found:
            return name
    return None


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def resolve(requested: str, cuda: bool | None = None, instructions: str | None | bool = False) -> Precision:
    """The precision `requested` (auto, fp32, bf16) means here. `cuda`, `instructions`: what this machine
    has (default: found out; tests pass their own)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    device = "cuda" if cuda else "cpu"
    if requested not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision: one of auto, fp32, bf16; got {requested!r}")
    found = None if cuda else (cpu_bf16_instructions() if instructions is False else instructions)
    if requested == "bf16" and not cuda and not found:
        return Precision("bf16", device, "bf16 as configured (this CPU has no bf16 instructions: slower than fp32)")
    if requested != "auto":
        return Precision(requested, device, f"{requested} as configured")
    if cuda:
        return Precision("bf16", device, "auto: bf16 on a GPU")
    if found:
        return Precision("bf16", device, f"auto: this CPU has {found} (bf16 autocast, fp32 weights)")
    return Precision("fp32", device, "auto: this CPU has no bf16 instructions (AMX-BF16, AVX512-BF16)")
