"""`python -m flows.pipeline`: a bad profile, override or device setting is one message and exit 2,
before any Prefect flow or server starts (so no Prefect traceback joins it)."""

import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.machine as machine
from pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args, message", [
    (["--profile", "nosuchprofile"], "error: unknown profile 'nosuchprofile'"),
    (["--profile", "smoke", "--set", "split.foo=1"], "split.foo: unknown key"),
    (["--profile", "smoke", "--set", "competition.filename={id}.jpg"], '--set "competition.filename=\'{id}.jpg\'"'),
])
def test_a_bad_profile_or_override_is_one_message_and_exit_2(args, message, tmp_path):
    done = subprocess.run([sys.executable, "-m", "flows.pipeline", *args, "--root", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr and "database is locked" not in done.stderr


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(machine, "this_machine", lambda: machine.Machine(cuda_devices=0, mps=False))


def test_a_gpu_setting_on_a_cpu_machine_is_refused_before_prefect_starts(cpu_only, monkeypatch, tmp_path, capsys):
    import flows.pipeline as pipeline

    def no_prefect(*args, **kwargs):
        raise AssertionError("Prefect was started")

    monkeypatch.setattr(pipeline, "bind_ephemeral_server", no_prefect)
    monkeypatch.setattr(pipeline, "pipeline_flow", no_prefect)
    rc = pipeline.main(["--profile", "smoke", "--set", "finetune.trainer.accelerator=gpu", "--root", str(tmp_path)])
    assert rc == 2
    assert "error: finetune.trainer.accelerator=gpu asks for a GPU, and this machine has no CUDA GPU" in capsys.readouterr().err


def test_the_deployed_flow_refuses_a_gpu_setting_on_a_cpu_machine_before_any_stage(cpu_only, tmp_path):
    from flows.pipeline import pipeline_flow

    with pytest.raises(ConfigError, match=r"features\.device=cuda asks for a CUDA GPU"):
        pipeline_flow.fn(profile="smoke", overrides={"features.device": "cuda"}, root=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_fanned_out_per_fold_stages_are_the_workers_to_check(cpu_only):
    from flows.params import RunParameters
    from flows.pipeline import check_runs_here

    gpu_training = {"finetune.trainer.accelerator": "gpu"}
    check_runs_here(RunParameters(profile="smoke", overrides=gpu_training, fanout_pool="gpus"))
    with pytest.raises(ConfigError, match="finetune.trainer.accelerator=gpu"):
        check_runs_here(RunParameters(profile="smoke", overrides=gpu_training))
    with pytest.raises(ConfigError, match="features.device=cuda"):  # features runs on the coordinator
        check_runs_here(RunParameters(profile="smoke", overrides={"features.device": "cuda"}, fanout_pool="gpus"))
