"""Every command in the bash blocks of README.md and docs/deploy.md works as written: the ones that run offline in seconds
run (configure), the rest are checked against what they call (make targets, modules and scripts,
their flags, config keys given to `dvc exp run -S`, deployment names and their parameters)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = {name: (ROOT / name).read_text() for name in ("README.md", "docs/deploy.md")}


def readme_commands() -> list[str]:
    """Each command line of the bash blocks (continuations joined, comments dropped)."""
    commands = []
    blocks = [block for text in DOCS.values() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.extend(part.strip() for part in command.split("&&"))
    return commands


COMMANDS = readme_commands()


def words(command: str) -> list[str]:
    return shlex.split(re.sub(r"<[^>]*>", "PLACEHOLDER", command))  # <your value> placeholders


def flags(command: str) -> list[str]:
    return [w.split("=")[0] for w in words(command) if w.startswith("--")]


def help_text(args: list[str]) -> str:
    done = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_readme_has_commands():
    assert "make demo" in COMMANDS and "make test" in COMMANDS


def test_every_make_target_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    for command in COMMANDS:
        if command.startswith("make "):
            assert words(command)[1] in targets, command


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m pipeline configure")])
def test_configure_commands_run(command, tmp_path):
    done = subprocess.run([sys.executable, *words(command)[1:], "--out", str(tmp_path / "params.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "params.yaml").exists()


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python benchmarks/")])
def test_benchmark_commands_take_their_flags(command):
    script = words(command)[1]
    assert (ROOT / script).exists(), script
    text = help_text([script])
    for flag in flags(command):
        assert flag in text, f"{command}: {flag} is not an option of {script}"


def test_pipeline_flow_commands_take_their_flags():
    text = help_text(["-m", "flows.pipeline"])
    for command in COMMANDS:
        if re.match(r"(\.venv/bin/)?python -m flows\.pipeline", command):
            for flag in flags(command):
                assert flag in text, f"{command}: {flag} is not an option of flows.pipeline"


def test_dvc_exp_run_settings_are_config_keys():
    from pipeline.config import load_profile

    for command in COMMANDS:
        if command.startswith("dvc exp run"):
            parts = words(command)
            settings = [parts[i + 1] for i, w in enumerate(parts) if w == "-S"]
            assert settings, command
            load_profile("demo", dict(s.split("=", 1) for s in settings))  # an unknown key raises


def test_deployment_runs_name_registered_deployments_and_their_parameters():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    flows = {}
    for deployment in spec["deployments"]:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
        flows[f"{flow.name}/{deployment['name']}"] = flow
    for command in COMMANDS:
        if " deployment run " in f" {command} ":
            parts = words(command)
            name = parts[parts.index("run") + 1]
            assert name in flows, command
            params = [parts[i + 1].split("=")[0] for i, w in enumerate(parts) if w == "--param"]
            assert set(params) <= set(flows[name].parameters.properties), command


def test_start_worker_commands_take_their_flags():
    script = (ROOT / "scripts/start_worker.sh").read_text()
    for command in COMMANDS:
        if command.startswith("scripts/start_worker.sh"):
            for flag in flags(command):
                assert f"{flag})" in script, f"{command}: {flag} is not an option of the script"
