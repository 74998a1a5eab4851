"""The task layer: every registered objective builds from its default config and trains on real shards with
views; the momentum teacher follows its formula, stays out of the optimizer, and survives a kill/resume exactly."""
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import run_config, step_metrics, write_config
from test_train import ENV, sigkill_after_first_checkpoint
from vlp import checkpoint as ckpt_io
from vlp.config import TeacherConfig, config_from_dict
from vlp.data.mixing import make_loader
from vlp.models.teacher import MomentumTeacher
from vlp.objectives import OBJECTIVES
from vlp.train import Trainer


def _one_objective_config(demo_data, tmp_path, name: str) -> dict:
    cfg = run_config(demo_data, tmp_path / name, data={"batch": {"paired": 4, "labeled": 4, "unlabeled": 4},
                                                         "workers": 0})
    cfg["objectives"] = {name: {}}
    return cfg


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_registered_objective_runs_forward_and_backward_with_its_views(demo_data, tmp_path, name):
    """Default config, one real mixed batch (with the objective's view groups), loss and metrics, gradients."""
    trainer = Trainer(config_from_dict(_one_objective_config(demo_data, tmp_path, name)))
    task = trainer.task
    obj = task.objectives[name][0]
    batch, meta = next(iter(make_loader(trainer.dataset, 0)))
    for group in task.view_groups:
        views = batch.views[group.name]
        rows = int(batch.rows_of(group.kinds).sum())
        assert views.shape[:2] == (len(group.transforms), rows) and torch.isfinite(views).all()
    trainer.model.train()
    with torch.no_grad():  # a zero-initialised head (timm's recipe) would hide the gradient path to the tower
        for head in task.student.head_names:
            for p in getattr(task.student, head).parameters():
                if p.ndim > 1 and p.abs().sum() == 0:
                    p.normal_(std=0.02)
    loss, metrics = trainer.compute_loss(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    assert {f"loss/{name}", "loss/total"} <= set(metrics)
    assert all(k.startswith(("loss/", f"{name}/")) for k in metrics), sorted(metrics)
    loss.backward()
    heads = {n for n in task.student.head_names}
    for head in heads:  # every head this objective added is trained
        grads = [p.grad for p in getattr(task.student, head).parameters()]
        assert grads and all(g is not None for g in grads), head
        assert any(g.abs().sum() > 0 for g in grads), head
    visual = [p.grad for p in task.student.clip.visual.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in visual)  # it reaches the shared image tower
    assert not any(True for _ in obj.parameters())  # objectives own no trainable parameters
    trainer.accelerator.end_training()


def test_teacher_tau_schedule_and_update_follow_the_formula():
    from conftest import student
    from vlp.config import ModelConfig
    from vlp.models.factory import create_clip

    clip, _, _ = create_clip("vlp-test-vit")
    model = student(clip, ModelConfig(), num_classes=3)
    teacher = MomentumTeacher(model, TeacherConfig(tau=0.99, tau_end=1.0), total_steps=100, heads=("classifier",))
    # solo-learn's MomentumUpdater: tau_end - (tau_end - tau) * (cos(pi * step / total) + 1) / 2
    for step in (0, 25, 50, 100):
        expected = 1.0 - (1.0 - 0.99) * (math.cos(math.pi * step / 100) + 1) / 2
        assert teacher.tau(step) == pytest.approx(expected, abs=1e-12)
    assert teacher.tau(0) == pytest.approx(0.99) and teacher.tau(100) == pytest.approx(1.0)
    assert MomentumTeacher(model, TeacherConfig(tau=0.9, schedule="constant"), 100).tau(70) == 0.9

    before = {n: p.detach().clone() for n, p in teacher.model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    tau = teacher.update(model, 25)
    live = dict(model.named_parameters())
    tracked = set(teacher.tracked)
    assert "clip.visual.conv1.weight" in tracked and "classifier.fc.weight" in tracked
    assert not any(n.startswith(("clip.transformer.", "mae_decoder.")) for n in tracked)
    for n, p in teacher.model.named_parameters():
        if n in tracked:
            assert torch.allclose(p, tau * before[n] + (1 - tau) * live[n].detach(), atol=1e-6), n
        else:
            assert torch.equal(p, before[n]), n
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_is_outside_the_optimizer_and_ema_decay_is_a_constant_tau_teacher(demo_data, tmp_path):
    cfg = run_config(demo_data, tmp_path / "ema", optim={"lr": 1e-3, "warmup_steps": 2, "ema_decay": 0.9},
                     train={"steps": 2, "save_every": 2, "log_every": 1, "progress": False})
    trainer = Trainer(config_from_dict(cfg))
    teacher = trainer.task.teacher
    assert teacher is not None and teacher.cfg.schedule == "constant" and teacher.cfg.scope == "all"
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    start = {n: p.detach().clone() for n, p in teacher.model.named_parameters()}
    trainer.fit()
    live = dict(trainer.task.student.named_parameters())
    saved = ckpt_io.find_checkpoint(tmp_path / "ema") / "teacher.safetensors"
    from safetensors.torch import load_file
    ema = load_file(str(saved))
    assert set(ema) == set(live)  # scope all: every parameter
    moved = [n for n in ema if not torch.equal(ema[n], start[n])]
    assert moved and all(not torch.equal(ema[n], live[n].detach()) for n in moved)  # an average, not a copy


def test_killed_run_with_a_teacher_resumes_to_identical_losses_and_teacher(demo_data, tmp_path):
    """BYOL (momentum teacher, two views per unlabeled row) + CLIP: SIGKILL after a checkpoint, --resume auto;
    every later step's losses and the final teacher equal the uninterrupted run's."""
    steps, save_every = 10, 4

    def config(name):
        cfg = run_config(demo_data, tmp_path / name, train={"steps": steps, "save_every": save_every,
                                                             "log_every": 1, "progress": False})
        cfg["objectives"] = {"contrastive": {"weight": 1.0, "labels_as_text": True},
                             "byol": {"weight": 1.0, "hidden_dim": 64, "proj_dim": 32}}
        cfg["teacher"] = {"tau": 0.9}
        return write_config(tmp_path / f"{name}.yaml", cfg)

    subprocess.run([sys.executable, "-m", "vlp.train", "--config", str(config("ref"))], env=ENV, check=True,
                   capture_output=True, timeout=400)
    reference = step_metrics(tmp_path / "ref")

    run_dir, path = tmp_path / "killed", config("killed")
    saved = sigkill_after_first_checkpoint(path, run_dir, timeout=300)
    assert saved and (saved[-1] / "teacher.safetensors").is_file()
    killed_at = json.loads((saved[-1] / ckpt_io.STATE_FILE).read_text())["step"]
    assert killed_at < steps, "the run finished before it could be killed"

    subprocess.run([sys.executable, "-m", "vlp.train", "--config", str(path), "--resume", "auto"], env=ENV,
                   check=True, capture_output=True, timeout=400)
    resumed = step_metrics(run_dir)
    for step in range(killed_at + 1, steps + 1):
        for key in ("loss/total", "loss/contrastive", "loss/byol"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)
        assert resumed[step]["teacher/tau"] == pytest.approx(reference[step]["teacher/tau"])
    from safetensors.torch import load_file
    a = load_file(str(ckpt_io.find_checkpoint(tmp_path / "ref") / "teacher.safetensors"))
    b = load_file(str(ckpt_io.find_checkpoint(run_dir) / "teacher.safetensors"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_each_objective_validates_its_own_section_with_one_line_errors(demo_data, tmp_path):
    from vlp.config import ConfigError

    def error(mutate) -> str:
        cfg = run_config(demo_data, tmp_path / "e")
        mutate(cfg)
        with pytest.raises(ConfigError) as err:
            config_from_dict(cfg)
        msg = str(err.value)
        assert "\n" not in msg and "Value error" not in msg, msg
        return msg

    msg = error(lambda c: c["objectives"]["mae"].update(decoder_width="wide"))
    assert msg.startswith("objectives.mae.decoder_width: ") and "'wide'" in msg
    assert error(lambda c: c["objectives"]["mae"].update(decoder_widht=8)) == \
        "objectives.mae.decoder_widht: unknown key"
    assert error(lambda c: c["objectives"].update(simclrr={})).startswith(
        "objectives.simclrr: unknown objective (known: ")
    assert error(lambda c: c["model"].update(mae={"decoder_width": 8})) == \
        "model.mae: moved to objectives.mae (e.g. objectives.mae.decoder_width)"
    assert error(lambda c: c["objectives"].update(byol={"kinds": ["paired"]}) or c["data"]["batch"].update(paired=0)
                 or c["objectives"].pop("contrastive")) == "objectives.byol.kinds: no rows of ['paired'] in data.batch"
    assert error(lambda c: c["data"]["batch"].update(labeled=0) or c["objectives"]["contrastive"].update(
        labels_as_text=False)) == "objectives.supervised: needs data.batch.labeled > 0"
    # a shorthand weight and the objective's defaults
    cfg = run_config(demo_data, tmp_path / "ok")
    cfg["objectives"]["byol"] = 0.5
    ok = config_from_dict(cfg)
    assert ok.objectives["byol"].weight == 0.5 and ok.objectives["byol"].kinds == ["unlabeled"]
    assert ok.objectives["mae"].decoder_width == 32  # from the section, not the model
