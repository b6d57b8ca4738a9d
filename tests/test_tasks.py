"""Tasks: the registry, ``--task`` resolution and its errors, classification's loss and
metric through the task, the plugin example end to end, and the gate's direction."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import compressor
from compressor import cli, train
from compressor.config import Distill
from compressor.errors import EXIT_BAD_INPUT, BadInputError
from compressor.report import evaluate_gates
from compressor.tasks import TASKS, ClassificationTask, Task, register_task, resolve_task, task_path

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "task_plugin"
FAST = ["train.bn_recalibration_batches=2", "export.verify_samples=8", "train.batch_size=32"]


def test_registry_names_classification_and_refuses_a_second_registration():
    assert TASKS["classification"] is ClassificationTask
    assert isinstance(resolve_task("classification"), ClassificationTask)
    assert task_path(resolve_task()) == "classification"
    with pytest.raises(ValueError, match="already registered"):
        register_task("classification")(type("Other", (ClassificationTask,), {}))
    mine = ClassificationTask()
    assert resolve_task(mine) is mine
    assert isinstance(resolve_task(ClassificationTask), ClassificationTask)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (
            "clasification",
            ["--task must be one of classification", "Did you mean 'classification'"],
        ),
        ("no_such_module:Task", ["Cannot import 'no_such_module' for --task", "PYTHONPATH"]),
        ("my_task:NoSuchTask", ["my_task has no attribute 'NoSuchTask' (--task"]),
        (
            "my_task:make_model",
            ["--task my_task:make_model", "not a subclass of compressor.tasks.Task"],
        ),
        ("my_task:", ["--task 'my_task:' must be package.module:Class"]),
    ],
)
def test_resolve_errors_name_task_and_the_fix(spec, words, monkeypatch):
    monkeypatch.chdir(PLUGIN)
    with pytest.raises(BadInputError) as info:
        resolve_task(spec)
    assert info.value.exit_code == EXIT_BAD_INPUT
    for word in words:
        assert word in str(info.value)
    assert "--arch" not in str(info.value)


def test_cli_bad_task_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["model.pt", "--task", "regression", "--out", str(tmp_path / "o")]) == 2
    assert "--task must be one of" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_classification_through_the_task_matches_the_loss_and_metric_as_before():
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3).eval().requires_grad_(False)
    student = nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    task, distill = resolve_task("classification"), Distill(weight=0.25, temperature=2.0)
    logits = student(x)
    ce = F.cross_entropy(logits, y)
    assert torch.equal(task.loss(logits, y, x, None, distill), ce)
    mixed = task.loss(logits, y, x, teacher(x), distill)
    assert torch.equal(mixed, train.training_loss(logits, y, x, teacher, distill))
    assert torch.allclose(
        mixed, 0.75 * ce + 0.25 * train.distillation_loss(logits, teacher(x), 2.0)
    )

    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    acc, loss = task.evaluate(student, loader, torch.device("cpu"))
    with torch.no_grad():
        out = student(x)
    assert acc == pytest.approx(100.0 * float((out.argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-6)
    assert (acc, loss) == train.evaluate(student, loader, torch.device("cpu"))


def test_the_training_loop_uses_the_task_loss_with_the_teachers_outputs():
    seen = []

    class Recording(ClassificationTask):
        def loss(self, outputs, targets, inputs, teacher_outputs, distill):
            seen.append(teacher_outputs is not None)
            return super().loss(outputs, targets, inputs, teacher_outputs, distill)

    def run(task):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        teacher = nn.Linear(4, 3).eval().requires_grad_(False)
        loader = DataLoader(TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,))), 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = train.make_scheduler(opt, "constant", 3)
        distill = Distill(weight=0.5, temperature=2.0)
        return train.train_one_epoch(
            model,
            loader,
            opt,
            sched,
            torch.device("cpu"),
            teacher=teacher,
            distill=distill,
            task=task,
        )

    assert run(Recording()) == run(None)  # None: classification, as before
    assert seen == [True] * 3


def test_gate_direction_follows_the_metric():
    report = {"baseline": {"accuracy": 0.5}, "compressed": {"accuracy": 0.6}}
    higher = evaluate_gates(report, max_accuracy_drop=0.05)[0]
    assert higher["value"] == pytest.approx(-0.1) and higher["passed"]
    lower = {**report, "metric": {"name": "mse", "higher_is_better": False}}
    gate = evaluate_gates(lower, max_accuracy_drop=0.05)[0]
    assert gate["value"] == pytest.approx(0.1) and not gate["passed"]  # the MSE rose by 0.1
    assert evaluate_gates(lower, max_accuracy_drop=0.2)[0]["passed"]
    better = {**lower, "compressed": {"accuracy": 0.4}}
    assert evaluate_gates(better, max_accuracy_drop=0.0)[0]["passed"]

    class LowerIsBetter(Task):
        higher_is_better = False

    assert LowerIsBetter().drop(0.5, 0.6) == pytest.approx(0.1)
    assert ClassificationTask().drop(90.0, 88.0) == pytest.approx(2.0)
    # the seeker compares scores: a lower-is-better metric is seen negated, so a worse
    # value always scores lower and the score's fall is the task's drop
    low, cls = LowerIsBetter(), ClassificationTask()
    assert low.score(0.5) - low.score(0.6) == pytest.approx(low.drop(0.5, 0.6))
    assert cls.score(90.0) - cls.score(88.0) == pytest.approx(cls.drop(90.0, 88.0))
    assert cls.top1_labels and not low.top1_labels  # INT8 top-1 only where it is the metric


def test_the_plugin_example_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(PLUGIN)
    import my_task  # the example, as --task imports it from the current folder

    model, data = my_task.make_example(tmp_path)
    out = tmp_path / "out"
    report = compressor.compress(
        str(model), arch="my_task:make_model", task="my_task:MeanSquaredTask", data=str(data),
        out=out, target_macs=1.5, max_accuracy_drop=1.0, overrides=["train.epochs=2", *FAST],
    )  # fmt: skip
    assert report["exit_code"] == 0
    assert report["metric"] == {"name": "mse", "higher_is_better": False}
    assert report["input"]["task"] == "my_task:MeanSquaredTask"
    base, comp = report["baseline"]["accuracy"], report["compressed"]["accuracy"]
    assert 0 < base < 1 and 0 < comp < 1  # MSEs of targets of size ~0.1, not percentages
    assert report["compressed"]["channels_kept"] < report["compressed"]["channels_total"]
    assert report["reduction"]["macs_x"] >= 0.95 * 1.5
    gate = next(g for g in report["gates"] if g["name"] == "accuracy_drop")
    assert gate["value"] == pytest.approx(comp - base)
    assert json.loads((out / "report.json").read_text())["metric"]["name"] == "mse"
    assert "mse" in (out / "report.md").read_text().split("\n\n")[1]
    assert (out / "model.onnx").is_file()
