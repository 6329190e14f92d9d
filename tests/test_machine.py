"""The device settings a stage uses, checked against the machine it is about to run on."""

import subprocess
import sys

import pytest

from pipeline.config import load_profile
from pipeline.machine import Machine, MachineError, check_machine, machine_problems
from pipeline.registry import STAGES

CPU = Machine(cuda_devices=0, mps=False)
ONE_GPU = Machine(cuda_devices=1, mps=False)
TWO_GPUS = Machine(cuda_devices=2, mps=False)
MAC = Machine(cuda_devices=0, mps=True)


def test_the_gpu_profile_runs_on_a_gpu_and_is_refused_on_a_cpu_naming_key_value_machine_and_stages():
    statefarm = load_profile("statefarm")
    assert machine_problems(statefarm, STAGES, ONE_GPU) == []
    [problem] = machine_problems(statefarm, STAGES, CPU)
    assert problem.startswith("finetune.trainer.accelerator=gpu asks for a GPU, and this machine has no CUDA GPU (CPU only)")
    assert "Used by finetune, pseudo, member" in problem and "--set finetune.trainer.accelerator=auto" in problem
    with pytest.raises(MachineError, match=r"finetune\.trainer\.accelerator=gpu"):
        check_machine(statefarm, ["finetune"], CPU)
    check_machine(statefarm, ["ingest", "split", "features", "head", "report"], CPU)  # the CPU stages still run


@pytest.mark.parametrize("override, machine, expected", [
    ("features.device=cuda", CPU, "features.device=cuda asks for a CUDA GPU, and this machine has no CUDA GPU"),
    ("features.device=cuda:1", ONE_GPU, "features.device=cuda:1 asks for CUDA GPU 1, and this machine has 1 CUDA GPU"),
    ("features.device=mps", TWO_GPUS, "features.device=mps asks for Apple's MPS backend, and this machine has 2 CUDA GPUs"),
    ("head.accelerator=cuda", MAC, "head.accelerator=cuda asks for a CUDA GPU, and this machine has no CUDA GPU (Apple MPS only)"),
    ({"finetune.trainer.accelerator": "gpu", "finetune.trainer.devices": 4}, TWO_GPUS,
     "finetune.trainer.devices=4 asks for 4 GPUs, and this machine has 2 CUDA GPUs"),
    ({"finetune.trainer.accelerator": "gpu", "finetune.trainer.devices": "0,2"}, TWO_GPUS,
     "finetune.trainer.devices=0,2 asks for GPU indices 0,2, and this machine has 2 CUDA GPUs"),
    ({"finetune.trainer.accelerator": "auto", "finetune.trainer.devices": -1}, CPU,
     "finetune.trainer.devices=-1 asks for GPUs, and this machine has no CUDA GPU (CPU only): -1 and GPU indices count GPUs"),
    ({"finetune.trainer.accelerator": "cpu", "finetune.trainer.devices": "0,1"}, TWO_GPUS,
     "finetune.trainer.devices=0,1 asks for GPUs, and this machine has 2 CUDA GPUs: with finetune.trainer.accelerator=cpu"),
])
def test_a_setting_this_machine_cannot_run_is_named_with_what_the_machine_has(override, machine, expected):
    cfg = load_profile("smoke", override if isinstance(override, dict) else [override])
    problems = machine_problems(cfg, STAGES, machine)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


@pytest.mark.parametrize("override, machine", [
    ({"finetune.trainer.accelerator": "auto", "finetune.trainer.devices": 2}, CPU),  # two CPU processes
    ({"finetune.trainer.accelerator": "auto", "finetune.trainer.devices": -1}, TWO_GPUS),
    ({"finetune.trainer.accelerator": "gpu", "finetune.trainer.devices": "0,1"}, TWO_GPUS),
    ({"finetune.trainer.accelerator": "gpu"}, MAC),  # Lightning's gpu is MPS on a Mac
    ({"features.device": "cuda:1", "head.accelerator": "cuda"}, TWO_GPUS),
])
def test_settings_that_fit_the_machine_pass(override, machine):
    assert machine_problems(load_profile("smoke", override), STAGES, machine) == []


@pytest.mark.parametrize("override, stage, used", [
    ({"pretrain.device": "cuda"}, "pretrain", False),  # model.weights=none: pretrain trains nothing
    ({"pretrain.device": "cuda", "model.weights": "pretrain"}, "pretrain", True),
    ({"head.accelerator": "gpu", "ensemble.member_model": "head"}, "member", True),
    ({"head.accelerator": "gpu", "ensemble.member_model": "finetune"}, "member", False),
    ({"finetune.trainer.accelerator": "gpu", "ensemble.members": 0}, "member", False),
    ({"finetune.trainer.accelerator": "gpu"}, "pseudo", True),
    ({"finetune.trainer.accelerator": "gpu"}, "features", False),
])
def test_only_the_settings_a_stage_uses_are_checked(override, stage, used):
    assert bool(machine_problems(load_profile("smoke", override), [stage], CPU)) == used


def test_cpu_settings_are_checked_without_importing_torch():
    """configure checks every stage's settings: a CPU profile must not pay for importing torch."""
    code = ("import sys\nfrom pipeline.config import load_profile\nfrom pipeline.machine import machine_problems\n"
            "from pipeline.registry import STAGES\nassert machine_problems(load_profile('smoke'), STAGES) == []\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
