from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as cli_main
from pipeline.config import PROFILES, ConfigError, load_params, load_profile, write_params


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_validates(profile):
    cfg = load_profile(profile)
    assert cfg.profile == profile


def test_unknown_key_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"head\.nonsense: unknown key"):
        load_profile("smoke", ["head.nonsense=1"])


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"head\.dropout"):
        load_profile("smoke", ["head.dropout=1.5"])


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known: cpu, demo, demo-csv, smoke, statefarm"):
        load_profile("nope")


def test_overrides_are_parsed_as_yaml():
    cfg = load_profile("smoke", ["head.widths=[32, 16]", "head.lr=0.01", "ingest.source=dir", "ingest.path=/x"])
    assert cfg.head.widths == [32, 16] and cfg.head.lr == 0.01 and cfg.ingest.path == "/x"


def test_dict_overrides_match_string_overrides():
    assert load_profile("smoke", {"head.max_epochs": 7}) == load_profile("smoke", ["head.max_epochs=7"])


def test_params_round_trip_and_root(tmp_path):
    cfg = load_profile("smoke", ["split.n_folds=3"])
    path = write_params(cfg, tmp_path / "params.yaml")
    back = load_params(path)
    assert back.split.n_folds == 3
    assert back.paths.root == tmp_path  # artifacts resolve next to params.yaml
    assert "root" not in yaml.safe_load(path.read_text())["paths"]


def test_committed_params_yaml_is_the_resolved_demo_profile():
    """params.yaml in git is what `make demo` writes, so a fresh-clone `dvc repro` runs the demo."""
    committed = yaml.safe_load((Path(__file__).parent.parent / "params.yaml").read_text())
    assert committed == load_profile("demo").to_params()


def test_cli_configure_rejects_unknown_key_with_exit_2(tmp_path, capsys):
    rc = cli_main(["configure", "--profile", "smoke", "--set", "split.foo=1", "--out", str(tmp_path / "p.yaml")])
    assert rc == 2
    assert "split.foo: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_cli_help_lists_every_stage(capsys):
    from pipeline.registry import STAGES

    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    for stage in STAGES:
        assert stage in out


def test_a_profile_extends_another_and_overrides_it():
    """demo and smoke take the State Farm competition spec from statefarm; demo-csv swaps in the CSV layout."""
    statefarm, demo, csv = load_profile("statefarm"), load_profile("demo"), load_profile("demo-csv")
    assert demo.competition == statefarm.competition and demo.competition.group_column == "subject"
    assert demo.model.arch != statefarm.model.arch  # demo's own settings win over the base's
    assert csv.competition.layout == "csv" and csv.competition.group_column is None
    assert csv.features.copies == demo.features.copies  # what demo-csv does not say comes from demo


def test_profiles_that_extend_in_a_loop_are_refused(tmp_path, monkeypatch):
    import pipeline.config as config

    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match="loop: a -> b -> a"):
        load_profile("a")


@pytest.mark.parametrize("override, message", [
    ({"competition.layout": "csv", "competition.labels_csv": None}, "layout=csv needs competition.labels_csv"),
    ({"competition.filename": "img.jpg"}, r"must contain \{id\} exactly once"),
    ({"competition.extensions": ["jpg"]}, "extensions must be like"),
    ({"competition.labels_csv": None}, "group_column is a column of competition.labels_csv"),
])
def test_an_impossible_competition_spec_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("smoke", override)


@pytest.mark.parametrize("text", ["", "profile: demo\n", "seed: 0\nhead:\n  lr: 0.1\n"])
def test_a_params_file_that_is_not_a_complete_resolved_config_is_refused(tmp_path, text):
    """An empty or partial params.yaml must not silently run with the statefarm defaults."""
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"not a complete resolved config \(missing .*configure --profile"):
        load_params(path)
    assert cli_main(["head", "--params", str(path)]) == 2


def test_a_binary_params_file_is_a_clear_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="params.yaml: not"):
        load_params(path)


@pytest.mark.parametrize("override, key", [
    ("features.seed=-1", "features.seed"), ("split.seed=-1", "split.seed"), ("model.input_size=[0, 0]", "model.input_size"),
    ("features.device=tpu", "features.device"), ("head.widths=[0]", "head.widths"), ("ensemble.members=-1", "ensemble.members"),
    ("finetune.trainer.devices=0", "finetune.trainer.devices"), ("finetune.trainer.devices=abc", "finetune.trainer.devices"),
    ("finetune.trainer.devices=true", "finetune.trainer.devices"), ("finetune.trainer.precision=foo", "finetune.trainer.precision"),
    ("finetune.trainer.strategy=bogus", "finetune.trainer.strategy"), ("finetune.trainer.accelerator=tpu", "finetune.trainer.accelerator"),
    ("head.accelerator=tpu", "head.accelerator"), ("finetune.lr=inf", "finetune.lr"), ("finetune.lr=.nan", "finetune.lr"),
    ("finetune.weight_decay=.inf", "finetune.weight_decay"), ("head.first_epoch_lr=inf", "head.first_epoch_lr"),
    ("pretrain.lr=-.inf", "pretrain.lr"), ("pseudo.lr=inf", "pseudo.lr"), ("head.weight_decay=inf", "head.weight_decay"),
])
def test_values_a_stage_would_crash_on_are_refused_at_configure(override, key, tmp_path, capsys):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_profile("smoke", [override])
    assert cli_main(["configure", "--profile", "smoke", "--set", override, "--out", str(tmp_path / "p.yaml")]) == 2
    assert f"  {key}" in capsys.readouterr().err  # the key, on its own line
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize("devices", ["auto", -1, "-1", 1, 4, "2", "0,1", "1,"])
def test_every_device_count_lightning_takes_is_accepted(devices):
    cfg = load_profile("smoke", {"finetune.trainer.accelerator": "gpu", "finetune.trainer.devices": devices})
    assert cfg.finetune.trainer.devices == devices


@pytest.mark.parametrize("override", ["competition.filename={id}.jpg", "head.widths=[64"])
def test_an_override_that_is_not_yaml_is_an_error_showing_how_to_quote_it(override, tmp_path, capsys):
    key, value = override.split("=", 1)
    quoted = f'--set "{key}=\'{value}\'"'
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_profile("smoke", [override])
    assert repr(override) in str(info.value) and quoted in str(info.value)
    assert cli_main(["configure", "--profile", "smoke", "--set", override, "--out", str(tmp_path / "p.yaml")]) == 2
    assert quoted in capsys.readouterr().err


def test_the_quoted_override_the_error_suggests_is_taken():
    assert load_profile("smoke", ["competition.filename='{id}.jpg'"]).competition.filename == "{id}.jpg"


def test_configure_writes_a_config_for_a_gpu_machine_and_notes_what_will_not_run_here(tmp_path, capsys, monkeypatch):
    import pipeline.machine as machine

    monkeypatch.setattr(machine, "this_machine", lambda: machine.Machine(cuda_devices=0, mps=False))
    out = tmp_path / "p.yaml"
    assert cli_main(["configure", "--profile", "statefarm", "--out", str(out)]) == 0
    assert load_params(out).finetune.trainer.accelerator == "gpu"
    assert "finetune.trainer.accelerator=gpu asks for a GPU, and this machine has no CUDA GPU" in capsys.readouterr().err


def test_a_stage_asking_for_a_gpu_this_machine_lacks_refuses_to_start_naming_key_value_and_machine(tmp_path, capsys,
                                                                                                    monkeypatch):
    import pipeline.machine as machine

    monkeypatch.setattr(machine, "this_machine", lambda: machine.Machine(cuda_devices=0, mps=False))
    params = write_params(load_profile("smoke", ["features.device=cuda"]).at(tmp_path), tmp_path / "params.yaml")
    assert cli_main(["features", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "error: features.device=cuda asks for a CUDA GPU, and this machine has no CUDA GPU (CPU only)" in err
    assert "--set features.device=auto" in err
    assert not (tmp_path / ".locks").exists()  # refused before the stage took its outputs' lock
