"""Training on several processes: two gloo processes on the CPU, started by ``weakloc train
--devices 2 --strategy ddp`` (Lightning starts the command once more) and by torchrun.

Checked: the model folder is loadable and its validation metrics, recomputed here in one process
over the whole validation split, are the ones logged for the best epoch (so the ranks' shares
were gathered, each image once); only rank zero wrote; the effective batch size is reported; a
run whose rank 1 is killed resumes (under torchrun) and finishes.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from weakloc import load_model
from weakloc.data.dataset import ImageDataset, collate_skip_bad, eval_transform
from weakloc.data.labels import load_labels, split_train_val
from weakloc.evaluate.classification import classification_metrics
from weakloc.train.state import lost_peer_message

pytestmark = pytest.mark.slow

#: 36 images, 13 of them to validate: an odd number, so the two ranks' shares differ in size
N_IMAGES, VAL_FRACTION, VAL_IMAGES = 36, 0.25, 13
TRAIN = ["--backbone", "test_resnet", "--pretrained", "none", "--input-size", "32", "--batch-size", "8", "--workers", "0",
         "--accelerator", "cpu", "--devices", "2", "--no-interpretation"]
#: what a finished run leaves in its output folder, and nothing else (a second writer would add a
#: logs/version_1, temporaries or a second metrics file)
RUN_FILES = {"checkpoints/best.ckpt", "checkpoints/last.ckpt", "metrics.json", "model/config.json", "model/model.safetensors"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from weakloc.data.synthetic import SyntheticConfig, write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("ddp_data"),
                           SyntheticConfig(n_images=N_IMAGES, size=32, mode="binary", val_fraction=VAL_FRACTION, seed=3))


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID",
                 "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a test run under a launcher must not pass its own ranks on
    return env


def _train(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=_env())


def _whole_validation(model_dir: Path, data: Path) -> dict:
    """The saved model's metrics over every validation image, in this one process, the way
    ClassifierModule computes them (probabilities -> classification_metrics; the mean loss)."""
    model = load_model(model_dir)
    _, val = split_train_val(load_labels(data), 0.2, 0)  # the data's own split
    assert len(val) == VAL_IMAGES
    c = model.config
    loader = DataLoader(ImageDataset.from_labels(val, eval_transform(c.input_size, c.mean, c.std)), batch_size=64,
                        collate_fn=collate_skip_bad)
    logits, targets = [], []
    with torch.no_grad():
        for batch in loader:
            logits.append(model(batch["image"]))
            targets.append(batch["target"])
    logits, targets = torch.cat(logits), torch.cat(targets)
    assert len(targets) == len(val)
    metrics = classification_metrics(model.probabilities(logits), targets, c.task, c.positive_class)
    return {"val_loss": float(F.cross_entropy(logits, targets)), **{f"val_{k}": v for k, v in metrics.items()}}


def _check_run(out: Path, data: Path, result: subprocess.CompletedProcess, epochs: int, runs: int = 1) -> dict:
    """A finished two-process run: rank zero's files only, reported once, a history of at least
    ``epochs`` epochs, each once, and the best epoch's logged figures equal to the saved model's
    over the whole validation split. ``runs``: the commands that wrote into ``out`` (each its own
    CSV log)."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert printed.count("model saved to") == 1 and printed.count("best epoch") == 1, printed[-3000:]
    assert "effective batch size 16 (8 per process x 2 x 1 accumulated), lr 0.002 (as given, not scaled)" in printed
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    expected = RUN_FILES | {f"logs/version_{i}/metrics.csv" for i in range(runs)}
    assert written == expected, written ^ expected
    report = json.loads((out / "metrics.json").read_text())
    assert report["training"] == {"processes": 2, "num_nodes": 1, "devices_per_node": 2, "strategy": "DDPStrategy",
                                  "batch_size_per_process": 8, "accumulate_grad_batches": 1, "effective_batch_size": 16,
                                  "lr": 0.002, "lr_scaled": False}
    history = [h["epoch"] for h in report["history"]]
    assert history == list(range(len(history))) and len(history) >= epochs, history
    best = report["best"]
    assert best["val_images"] == VAL_IMAGES
    recomputed = _whole_validation(out / "model", data)
    assert set(recomputed) == {k for k in best if k.startswith("val_") and k != "val_images"}
    for name, value in recomputed.items():
        assert best[name] == pytest.approx(value, abs=1e-5), (name, best[name], value)
    rows = []
    for log in sorted(out.glob("logs/version_*/metrics.csv")):
        with open(log, newline="") as f:
            rows += [r for r in csv.DictReader(f) if r.get("val_acc") and int(r["epoch"]) == best["best_epoch"]]
    assert len(rows) == 1 and float(rows[0]["val_auroc"]) == pytest.approx(recomputed["val_auroc"], abs=1e-5)
    return best


def test_two_gloo_processes_train_one_model_whose_logged_metrics_are_the_whole_validation_sets(tmp_path, data):
    out = tmp_path / "out"
    result = _train([sys.executable, "-m", "weakloc.cli", "train", str(data), "-o", str(out), "--epochs", "2",
                     "--strategy", "ddp", *TRAIN])
    _check_run(out, data, result, epochs=2)
    # the model went channels-last before DDP built its gradient buckets (they take the parameters' strides)
    assert "Grad strides do not match" not in result.stdout + result.stderr


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the second process through /proc")
def test_a_run_whose_second_process_is_killed_resumes_under_torchrun(tmp_path, data):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "weakloc.cli", "train", str(data), "-o", str(out), "--strategy", "ddp", *TRAIN]
    # many epochs, so the run is surely still training when its rank 1 is killed after the first one
    proc = subprocess.Popen([*command, "--epochs", "30"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        (rank1,) = _children(proc.pid)  # Lightning starts rank 1 as the command's child
        os.kill(rank1, signal.SIGKILL)
        printed, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode not in (0, None), printed[-3000:]
    assert "lost another one" in printed and "--resume" in printed, printed[-3000:]  # one line saying how to go on
    # resume the 30-epoch run as a 2-epoch one: it trains what is left of those (if anything) and finishes
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "weakloc.cli"]
    resumed = _train([*torchrun, *command[3:], "--epochs", "2", "--resume"])
    _check_run(out, data, resumed, epochs=2, runs=2)


OBSERVED = """
import subprocess, sys, time
from pathlib import Path
from lightning.pytorch.strategies.launchers import subprocess_script as launcher
from weakloc.train.state import peer_deaths_reported

last = Path(sys.argv[1])
with peer_deaths_reported(last, world=2):
    child = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    launcher._launch_process_observer([child])  # what Lightning's launcher calls after starting its children
    time.sleep(60)  # the observer kills this process long before
print("not killed")
"""


def test_lightnings_observer_says_which_process_ended_before_it_kills_the_main_one(tmp_path):
    """Lightning's observer SIGKILLs the main process a few seconds after a child died; whether gloo
    reported the lost peer first is a race, so the observer itself prints the line."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"state")
    script = tmp_path / "observed.py"
    script.write_text(OBSERVED)
    done = subprocess.run([sys.executable, str(script), str(last)], capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == -signal.SIGKILL and "not killed" not in done.stdout
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert f"training process 0 of 2 lost another one (process 1 was killed by SIGKILL); {last} holds the last validated " \
           "epoch: run the same command with --resume to continue" in line


def test_a_lost_peer_before_any_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    line = lost_peer_message(1, 4, "Connection closed by peer", tmp_path / "last.ckpt")
    assert line == ("training process 1 of 4 lost another one (Connection closed by peer); no checkpoint was written yet, "
                    "so there is nothing to resume: run it again")
