"""The one training path: optimiser factory, schedules, settings from any config section, the
checkpoint format and its errors."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from pipeline.config import FinetuneConfig, HeadConfig
from pipeline.errors import StageError
from pipeline.training.checkpoint import load_network_file, save_network
from pipeline.training.classifier import ClassifierModule, batchnorm_frozen
from pipeline.training.optim import TrainSettings, create_optimizer, first_epoch_schedule


@pytest.mark.parametrize("name, cls, extra", [
    ("adam", torch.optim.Adam, {}),
    ("sgd", torch.optim.SGD, {"nesterov": False, "momentum": 0.9}),
    ("nesterov", torch.optim.SGD, {"nesterov": True, "momentum": 0.9}),
    ("rmsprop", torch.optim.RMSprop, {}),
    ("adamw", torch.optim.AdamW, {}),
])
def test_optimizers_from_config(name, cls, extra):
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = create_optimizer([{"params": params}], TrainSettings.from_section(HeadConfig(optimizer=name, lr=0.01)))
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.01
    for key, value in extra.items():
        assert opt.param_groups[0][key] == value


def test_first_epoch_runs_at_the_low_learning_rate():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    schedule = first_epoch_schedule(opt, first_epoch_lr=1e-4, lr=1e-2)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert seen == pytest.approx([1e-4, 1e-2, 1e-2])



def test_finetune_onecycle_warms_up_then_anneals_every_layer_group_to_near_zero():
    """finetune.schedule=onecycle (the cpu profile's): per step, each param group from its own peak
    (lr * layer_lr_decay**k) / 25 up to that peak, then down to ~0 at the last step."""
    network = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    blocks = [[network[0]], [network[1]]]
    settings = TrainSettings.from_section(FinetuneConfig(schedule="onecycle", lr=1e-2, layer_lr_decay=0.5,
                                                         unfreeze_blocks=5))
    module = ClassifierModule(network, settings, blocks)
    module._trainer = SimpleNamespace(estimated_stepping_batches=20)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert configured["lr_scheduler"]["interval"] == "step"
    peaks = [1e-2, 5e-3, 2.5e-3]  # the head, then blocks from the end
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([p / 25 for p in peaks])
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert max(step[0] for step in seen) == pytest.approx(peaks[0])
    assert [max(step[i] for step in seen) for i in range(3)] == pytest.approx(peaks)
    assert all(lr < peak * 0.01 for lr, peak in zip(seen[-1], peaks, strict=True))


def test_settings_come_from_either_section():
    head = TrainSettings.from_section(HeadConfig(lr=0.01, first_epoch_lr=0.001))
    assert (head.lr, head.first_epoch_lr, head.unfreeze_blocks) == (0.01, 0.001, None)
    ft = TrainSettings.from_section(FinetuneConfig(unfreeze_blocks=3), seed=7)
    assert (ft.unfreeze_blocks, ft.seed, ft.layer_lr_decay) == (3, 7, 0.5)


def test_checkpoint_round_trip_and_a_truncated_file_names_itself(tmp_path):
    net = torch.nn.Linear(3, 2)
    path = save_network(tmp_path / "model.pt", net, {"stage": "x"})
    blob = load_network_file(path)
    assert blob["meta"] == {"stage": "x"} and torch.equal(blob["state_dict"]["weight"], net.weight)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(StageError, match=r"model\.pt: unreadable checkpoint"):
        load_network_file(path)
    with pytest.raises(StageError, match="not found"):
        load_network_file(tmp_path / "missing.pt")


def test_a_truncated_checkpoint_means_a_fresh_fit_not_a_traceback_on_every_rerun(tmp_path):
    """A best.ckpt/last.ckpt cut short (a kill mid-write, a full disk) is not trusted for reuse or resume."""
    from pipeline.io import atomic_write_json
    from pipeline.training.resume import RUN_FILE, plan_run

    torch.save({"state_dict": {}}, tmp_path / "best.ckpt")
    atomic_write_json(tmp_path / RUN_FILE, {"fingerprint": "f", "status": "complete"})
    assert plan_run(tmp_path, "f", resume=True)[0] == "reuse"
    (tmp_path / "best.ckpt").write_bytes((tmp_path / "best.ckpt").read_bytes()[:30])
    atomic_write_json(tmp_path / RUN_FILE, {"fingerprint": "f", "status": "complete"})
    assert plan_run(tmp_path, "f", resume=True) == ("fresh", None)
    assert not (tmp_path / "best.ckpt").exists()  # cleared for the fresh run


class RunningMeans(L.Callback):
    """Each batchnorm layer's running mean after every training epoch."""

    def __init__(self) -> None:
        self.after_epoch: list[list[torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.after_epoch.append([m.running_mean.clone() for m in module.modules() if isinstance(m, torch.nn.BatchNorm1d)])


@pytest.mark.parametrize(("setting", "moved"), [(False, [True, True]), (True, [False, False]),
                                                ("first_epoch", [False, True])])
def test_batchnorm_statistics_freeze_every_epoch_only_the_first_or_never(tmp_path, setting, moved):
    """With validation between epochs (Lightning restores the modules' modes after it): "first_epoch"
    keeps the running statistics through epoch 0 and lets them follow the data from epoch 1, in the
    head (outside the blocks) and in a block alike."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2),
                                  torch.nn.BatchNorm1d(2))
    blocks = [[network[0], network[1]]]
    inputs = torch.randn(32, 3) * 3 + 5  # far from the initial statistics (mean 0, variance 1)
    rows = [{"input": x, "target": torch.tensor([1.0, 0.0]), "temperature": torch.tensor(1.0), "label": torch.tensor(0)}
            for x in inputs]
    loader = torch.utils.data.DataLoader(rows, batch_size=8)
    settings = TrainSettings(lr=1e-3, freeze_bn_stats=setting)
    means = RunningMeans()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[means],
                        default_root_dir=tmp_path, num_sanity_val_steps=0)
    start = [m.running_mean.clone() for m in network.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    trainer.fit(ClassifierModule(network, settings, blocks), loader, loader)
    for epoch, before in enumerate([start, means.after_epoch[0]]):
        changed = [not torch.allclose(a, b) for a, b in zip(before, means.after_epoch[epoch], strict=True)]
        assert changed == [moved[epoch]] * 2, f"epoch {epoch}"
    assert batchnorm_frozen("first_epoch", 0) and not batchnorm_frozen("first_epoch", 1)
