"""Whether this machine can run a stage's device settings: the CUDA GPUs and Apple MPS it has against the
accelerators, device counts and torch devices the config asks for.

The schema (pipeline/config.py) accepts every supported value on any machine, because a GPU profile is
legitimately written on a CPU machine (params.yaml in git, a fan-out coordinator configuring its GPU
workers). Where a stage is about to run (``python -m pipeline <stage>``, the Prefect flow before its
first stage) the settings it uses are checked against this machine, and a mismatch is one clear error
naming the key, the value and what the machine has, instead of a Lightning or torch traceback mid-run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pipeline.config import Config, ConfigError, TrainerConfig


class MachineError(ConfigError):
    """Settings that this machine cannot run (a GPU it does not have)."""


@dataclass(frozen=True)
class Machine:
    cuda_devices: int  # CUDA GPUs torch can use here
    mps: bool  # Apple's Metal backend

    def describe(self) -> str:
        if self.cuda_devices:
            return f"this machine has {self.cuda_devices} CUDA GPU{'s' if self.cuda_devices > 1 else ''}"
        return "this machine has no CUDA GPU" + (" (Apple MPS only)" if self.mps else " (CPU only)")


@functools.cache
def this_machine() -> Machine:
    import torch

    return Machine(torch.cuda.device_count() if torch.cuda.is_available() else 0, torch.backends.mps.is_available())


@dataclass(frozen=True)
class Mismatch:
    key: str
    value: object
    asks: str  # what the value needs, e.g. "a CUDA GPU"
    fix: str  # a value that runs here
    note: str = ""  # how the value is read, where that is the surprise
    elsewhere: bool = True  # a machine with more would run it (else only another value does)


# This machine, probed when first asked: settings that fit any machine (cpu, auto) never import torch.
Probe = Callable[[], Machine]


def torch_device_mismatch(key: str, device: str, machine: Probe) -> Mismatch | None:
    """``features.device`` / ``pretrain.device``: auto, cpu, cuda, cuda:N or mps."""
    if device in ("auto", "cpu"):
        return None
    if device == "mps":
        return None if machine().mps else Mismatch(key, device, "Apple's MPS backend", "auto")
    index = int(device.partition(":")[2] or 0)
    if index < machine().cuda_devices:
        return None
    return Mismatch(key, device, f"CUDA GPU {index}" if index else "a CUDA GPU", "auto")


def accelerator_mismatch(key: str, accelerator: str, machine: Probe) -> Mismatch | None:
    """A Lightning accelerator: auto, cpu, gpu (CUDA, or MPS on a Mac, as Lightning reads it), cuda or mps."""
    if accelerator == "cuda" and not machine().cuda_devices:
        return Mismatch(key, accelerator, "a CUDA GPU", "auto")
    if accelerator == "gpu" and not (machine().cuda_devices or machine().mps):
        return Mismatch(key, accelerator, "a GPU", "auto")
    if accelerator == "mps" and not machine().mps:
        return Mismatch(key, accelerator, "Apple's MPS backend", "auto")
    return None


def trainer_mismatches(prefix: str, trainer: TrainerConfig, machine: Probe) -> list[Mismatch]:
    """The accelerator, then the devices on the accelerator it resolves to here (Lightning's auto takes
    MPS, then CUDA, then the CPU)."""
    if mismatch := accelerator_mismatch(f"{prefix}.accelerator", trainer.accelerator, machine):
        return [mismatch]
    devices = str(trainer.devices).strip()
    if devices in ("auto", "1"):
        return []
    key = f"{prefix}.devices"
    if trainer.accelerator == "cpu":
        if devices.isdigit():
            return []  # processes
        return [Mismatch(key, trainer.devices, "GPUs", "1", f": with {prefix}.accelerator=cpu, devices is a number "
                                                              "of processes (-1 and GPU indices count GPUs)", elsewhere=False)]
    if trainer.accelerator == "auto" and not (machine().cuda_devices or machine().mps):
        if devices.isdigit():
            return []  # auto on a CPU machine: processes
        return [Mismatch(key, trainer.devices, "GPUs", "1",
                         ": -1 and GPU indices count GPUs; on a CPU, devices is a number of processes")]
    if devices == "-1":
        return []
    uses_mps = trainer.accelerator == "mps" or (trainer.accelerator in ("auto", "gpu") and machine().mps)
    available = 1 if uses_mps else machine().cuda_devices
    indices = [int(i) for i in devices.split(",") if i.strip()] if "," in devices else None
    if (max(indices) + 1 if indices else int(devices)) <= available:
        return []
    return [Mismatch(key, trainer.devices, f"GPU indices {devices}" if indices else f"{devices} GPUs", str(available))]


def stage_mismatches(cfg: Config, stage: str, machine: Probe) -> list[Mismatch]:
    """The device settings ``stage`` uses that this machine cannot run."""
    members = cfg.ensemble.members
    found: list[Mismatch | None] = []
    if stage == "pretrain" and cfg.model.weights == "pretrain":
        found.append(torch_device_mismatch("pretrain.device", cfg.pretrain.device, machine))
    if stage == "features":
        found.append(torch_device_mismatch("features.device", cfg.features.device, machine))
    if stage == "head" or (stage == "member" and members and cfg.ensemble.member_model == "head"):
        found.append(accelerator_mismatch("head.accelerator", cfg.head.accelerator, machine))
    if stage in ("finetune", "pseudo") or (stage == "member" and members and cfg.ensemble.member_model == "finetune"):
        found += trainer_mismatches("finetune.trainer", cfg.finetune.trainer, machine)
    return [m for m in found if m is not None]


def machine_problems(cfg: Config, stages: Iterable[str], machine: Machine | None = None) -> list[str]:
    """One line per setting of ``stages`` that this machine (or ``machine``) cannot run, naming the
    key, the value, what the machine has, the stages that use it, and a value that runs here."""
    def probe() -> Machine:
        return machine if machine is not None else this_machine()

    users: dict[Mismatch, list[str]] = {}
    for stage in stages:
        for mismatch in stage_mismatches(cfg, stage, probe):
            users.setdefault(mismatch, []).append(stage)
    return [f"{m.key}={m.value} asks for {m.asks}, and {probe().describe()}{m.note}. Used by {', '.join(names)}: "
            + (f"run {'them' if len(names) > 1 else 'it'} on a machine that has {m.asks}, or " if m.elsewhere else "")
            + f"override it with --set {m.key}={m.fix}"
            for m, names in users.items()]


def check_machine(cfg: Config, stages: Iterable[str], machine: Machine | None = None) -> None:
    """Raise ``MachineError`` when ``stages`` cannot run here with ``cfg``'s device settings."""
    problems = machine_problems(cfg, stages, machine)
    if problems:
        raise MachineError("\n".join(problems))
