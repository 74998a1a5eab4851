"""The momentum teacher: an exponential moving average of the student (BYOL, Grill et al. 2020; MoCo v3,
Chen et al. 2021; DINO, Caron et al. 2021), kept outside DDP/FSDP, always in eval mode, never trained.

After each optimizer step ``teacher = tau * teacher + (1 - tau) * student`` over the tracked parameters, with one
``torch._foreach_lerp_`` (as lightly's ``update_momentum``). ``tau`` follows solo-learn's ``MomentumUpdater``:
``tau_end - (tau_end - tau) * (cos(pi * step / total) + 1) / 2`` (cosine) or stays at ``tau`` (constant).
Scope ``image`` tracks the image tower (with its projection) and the heads objectives name (``teacher_heads``);
``all`` tracks every parameter (a plain EMA of the model, what ``optim.ema_decay`` asks for). An objective reads the
teacher's copy of a head through :meth:`MomentumTeacher.head`, which refuses a head the teacher does not track.
``state_dict_tracked`` is what a checkpoint saves (``teacher.safetensors``, student key names) and what ``vlp export
--weights teacher`` ships.

Under FSDP the teacher stays a full, unsharded copy on every rank (built before the student is wrapped), and
:meth:`update` reads the student's *full* parameters: the caller gathers them (``PretrainTask.after_optimizer_step``
runs it inside FSDP1's ``summon_full_params``), FSDP2 DTensor parameters are gathered here (``full_tensor``), and
wrapper parts of parameter names (``_fsdp_wrapped_module.``...) are ignored. Every rank then applies the same
update, so the copies stay identical and rank 0's is what a checkpoint saves.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from vlp.config import TeacherConfig


class MomentumTeacher(nn.Module):
    def __init__(self, student: nn.Module, cfg: TeacherConfig, total_steps: int, heads: tuple[str, ...] = ()):
        super().__init__()
        self.cfg = cfg
        self.total_steps = max(1, total_steps)
        self.model = copy.deepcopy(student)
        self.model.requires_grad_(False)
        self.model.eval()
        if cfg.scope == "image":
            self.model.use_text = False
            self.model.head_names = [n for n in self.model.head_names if n in heads]
            prefixes = ("clip.visual.", *(f"{h}." for h in heads))
            self.tracked = [n for n, _ in student.named_parameters() if n.startswith(prefixes)]
        else:
            self.tracked = [n for n, _ in student.named_parameters()]
        params = dict(self.model.named_parameters())
        self._params = [params[n] for n in self.tracked]

    def head(self, name: str) -> nn.Module:
        """The teacher's copy of the student's head ``name``: one it tracks (an objective's ``teacher_heads``, or
        every head under scope ``all``); an untracked copy would keep its initial weights, so asking for one fails."""
        if name not in self.model.head_names:
            raise KeyError(f"the teacher does not track head {name!r} (it tracks {self.model.head_names}); "
                           f"name it in the objective's teacher_heads")
        return getattr(self.model, name)

    def train(self, mode: bool = True):
        return super().train(False)  # always in eval mode

    def tau(self, step: int) -> float:
        c = self.cfg
        if c.schedule == "constant":
            return c.tau
        progress = min(1.0, step / self.total_steps)
        return c.tau_end - (c.tau_end - c.tau) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """EMA step towards the (unwrapped) student; returns the tau used."""
        from vlp.checkpoint import clean_key

        tau = self.tau(step)
        live = {clean_key(n): p for n, p in student.named_parameters()}
        src = [_full(live[n]).detach().to(dst.device, dst.dtype).reshape(dst.shape)  # FSDP: scalars as [1]
               for n, dst in zip(self.tracked, self._params)]
        torch._foreach_lerp_(self._params, src, 1.0 - tau)
        return tau

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def state_dict_tracked(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous() for n, p in zip(self.tracked, self._params)}

    @torch.no_grad()
    def load_tracked(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.tracked if n not in state]
        if missing:
            raise KeyError(f"teacher state lacks {len(missing)} tracked tensors, e.g. {missing[0]!r}")
        for n, p in zip(self.tracked, self._params):
            p.copy_(state[n])


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter: an FSDP2 (DTensor) shard is all-gathered; any other tensor as is."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p
