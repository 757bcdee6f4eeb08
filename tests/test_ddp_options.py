"""The several-process options of ``weakloc train`` / ``fine_tune``: --strategy, --num-nodes,
--devices on the CPU, and the layout under torchrun (its environment faked; nothing trains)."""

import pytest

from weakloc.errors import OptionError
from weakloc.train import fine_tune
from weakloc.train.fit import lightning_strategy, training_record
from weakloc.train.options import check_hardware, process_layout

TORCHRUN_2x3 = {"TORCHELASTIC_RUN_ID": "test", "RANK": "4", "LOCAL_RANK": "1", "GROUP_RANK": "1", "WORLD_SIZE": "6",
                "LOCAL_WORLD_SIZE": "3"}


@pytest.fixture
def torchrun(monkeypatch):
    """This process as rank 4 of torchrun --nnodes 2 --nproc-per-node 3."""
    for name, value in TORCHRUN_2x3.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def no_launcher(monkeypatch):
    for name in TORCHRUN_2x3:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "fsdp"}, r"--strategy: 'fsdp' is not one of auto, ddp, ddp_spawn"),
    ({"num_nodes": 0}, r"--num-nodes: 0 is out of range"),
    ({"num_nodes": 1.5}, r"--num-nodes: expected an integer"),
    ({"accelerator": "cpu", "devices": 0}, r"--devices: 0 is not a number of devices"),
])
def test_bad_layouts_are_refused_before_any_work(tmp_path, no_launcher, kwargs, message):
    with pytest.raises(OptionError, match=message):
        fine_tune(tmp_path / "no-such-data", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_several_cpu_processes_need_the_cpu_said_outright(no_launcher, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    check_hardware("cpu", 2, "ddp")
    check_hardware("cpu", "2", "ddp_spawn", 2)
    with pytest.raises(OptionError, match=r"--devices: 2 asks for 2 GPUs, but no CUDA GPU is used.*--accelerator cpu"):
        check_hardware("auto", 2, "ddp")


def test_the_layout_follows_torchrun_and_a_contradiction_is_one_line(torchrun):
    assert process_layout("auto", None) == (3, 2)
    assert process_layout(3, 2) == (3, 2)
    with pytest.raises(OptionError, match=r"--devices: 2 per node, but torchrun started 3 process\(es\) per node "
                                          r"\(--nproc-per-node\); give --devices 3 or auto"):
        process_layout(2, None)
    with pytest.raises(OptionError, match=r"--num-nodes: 1, but torchrun started 2 node\(s\) \(--nnodes\)"):
        process_layout("auto", 1)
    with pytest.raises(OptionError, match=r"--strategy: ddp_spawn starts processes itself, but torchrun started this one"):
        check_hardware("cpu", "auto", "ddp_spawn")


def test_without_a_launcher_the_layout_is_as_given(no_launcher):
    assert process_layout("auto", None) == ("auto", 1)
    assert process_layout("0,1", 2) == ([0, 1], 2)


def test_several_processes_let_ddp_skip_the_frozen_backbone(monkeypatch):
    from lightning.fabric.utilities import imports

    monkeypatch.setattr(imports, "_IS_INTERACTIVE", False)
    assert lightning_strategy("auto", "cpu", 1, 1) == "auto"
    assert lightning_strategy("auto", "cpu", 2, 1) == "ddp_find_unused_parameters_true"
    assert lightning_strategy("auto", "cpu", "auto", 2) == "ddp_find_unused_parameters_true"
    assert lightning_strategy("ddp_spawn", "cpu", 1, 1) == "ddp_spawn_find_unused_parameters_true"


def test_the_effective_batch_and_the_learning_rate_are_reported_unscaled():
    from types import SimpleNamespace

    from weakloc.config import TrainConfig

    trainer = SimpleNamespace(world_size=6, accumulate_grad_batches=2, num_nodes=2, num_devices=3, strategy=object())
    record = training_record(trainer, TrainConfig(batch_size=8, lr=1e-3))
    assert record["effective_batch_size"] == 8 * 6 * 2 and record["lr"] == 1e-3 and record["lr_scaled"] is False
    assert (record["processes"], record["num_nodes"], record["devices_per_node"]) == (6, 2, 3)
