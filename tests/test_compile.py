"""#29: train.compile compiles each transformer block (regional compilation, dynamic shapes), and the compiled
step computes what the eager one does: the same loss and gradients on a real masked multi-objective batch with a
momentum teacher, and the same features at another visible-token count without failing."""
import pytest
import torch

from conftest import run_config
from vlp.config import config_from_dict
from vlp.data.mixing import make_loader
from vlp.task import transformer_blocks
from vlp.train import Trainer


def _trainer(demo_data, tmp_path, compile_: bool) -> Trainer:
    tree = run_config(demo_data, tmp_path / f"run-{compile_}", data={"workers": 0},
                      train={"compile": compile_, "progress": False})
    tree["objectives"]["pseudolabel"] = {"weight": 1.0}  # a momentum teacher's forward in the step too
    return Trainer(config_from_dict(tree))


def test_compiled_step_equals_eager(demo_data, tmp_path):
    eager, compiled = _trainer(demo_data, tmp_path, False), _trainer(demo_data, tmp_path, True)
    try:
        blocks = transformer_blocks(compiled.task.student)
        assert blocks and all(b._compiled_call_impl is not None for b in blocks)
        assert compiled.task.teacher is not None
        assert all(b._compiled_call_impl is not None for b in transformer_blocks(compiled.task.teacher))
        assert not any(b._compiled_call_impl is not None for b in transformer_blocks(eager.task.student))
        compiled.task.student.load_state_dict(eager.task.student.state_dict())
        compiled.task.teacher.load_state_dict(eager.task.teacher.state_dict())
        batch, _ = next(iter(make_loader(eager.dataset, 0)))
        results = []
        for trainer in (eager, compiled):
            trainer.model.train()
            loss, metrics = trainer.compute_loss(batch, 0)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in trainer.task.student.named_parameters() if p.grad is not None}
            results.append((loss.detach(), metrics, grads))
        (l0, m0, g0), (l1, m1, g1) = results
        assert torch.isfinite(l0) and l1.item() == pytest.approx(l0.item(), rel=1e-5, abs=1e-6)
        for key in ("loss/contrastive", "loss/mae", "loss/supervised", "loss/pseudolabel"):
            assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-6), key
        assert g0.keys() == g1.keys() and len(g0) > 10
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)

        # another number of visible tokens (the masked pass at 50% instead of 75%): no failure, same features
        images = batch["image"][:4]
        for keep in (8, 12):
            ids = torch.stack([torch.randperm(16)[:keep] for _ in range(len(images))])
            with torch.no_grad():
                a = eager.task.student.encode_visible(images, ids)
                b = compiled.task.student.encode_visible(images, ids)
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
    finally:
        eager.release()
        compiled.release()
