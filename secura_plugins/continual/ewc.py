"""Online elastic weight consolidation (EWC) over the trainable parameters.

After each task the diagonal empirical Fisher of the trainable parameters is estimated
and folded into a running sum, and the parameters' values become the new anchors
(online EWC, Schwarz et al. 2018):

    F_t      = gamma * F_{t-1} + F_hat_t          # decayed sum over tasks
    theta*_t = theta at the end of task t
    penalty  = lambda / 2 * sum_i F_t[i] * (theta[i] - theta*_t[i]) ** 2

``F_hat`` is the mean over batches of the squared gradient of the training loss
(``grad ** 2``, the usual "empirical Fisher" diagonal; with one example per batch it is
the per-example empirical Fisher). Two ways to use the penalty:

* ``penalty(model)`` returns it as a tensor *with an autograd graph* (add it to the loss
  in a trainer's ``compute_loss``);
* ``penalty_grad_(model)`` adds its gradient ``lambda * F * (theta - theta*)`` straight
  into ``param.grad`` (for hosts where a callback cannot change the loss, e.g. in
  ``TrainerCallback.on_pre_optimizer_step``) and returns the penalty's value.

Both give the same gradient. Parameters are matched by name (``model.named_parameters()``),
so the state survives ``state_dict`` / ``save`` / ``load`` on a rebuilt model.

Example:
    >>> import torch
    >>> from secura_plugins.continual.ewc import EWC
    >>> model = torch.nn.Linear(3, 1)
    >>> ewc = EWC(lam=10.0)
    >>> batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(2)]
    >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
    >>> _ = ewc.consolidate(model, batches, loss_fn)
    >>> ewc.penalty(model).item()  # at the anchor the penalty is zero
    0.0
    >>> with torch.no_grad():
    ...     _ = model.weight.add_(1.0)
    >>> penalty = ewc.penalty(model)
    >>> penalty.backward()  # a real graph: the gradient reaches the parameters
    >>> bool(penalty > 0) and bool(model.weight.grad.abs().sum() > 0)
    True
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._fs import atomic_path

__all__ = ["EWC", "default_loss_fn", "trainable_parameters"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that require a gradient, by name (the set EWC protects)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def default_loss_fn(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Loss of a Hugging Face model on a batch dict: ``model(**batch).loss``.

    Tensors are moved to the model's device first; non-tensor entries are dropped.
    """
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return model(**inputs).loss


def _average_over_ranks(tensors: dict[str, torch.Tensor]) -> None:
    """In place: the mean of each tensor over the ranks of the default process group
    (no-op outside ``torch.distributed``). One flat all-reduce for all tensors."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    names = sorted(tensors)  # the same order on every rank
    flat = torch.cat([tensors[n].reshape(-1) for n in names])
    if dist.get_backend() == "nccl" and not flat.is_cuda:
        flat = flat.cuda()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.to(tensors[names[0]].device) / dist.get_world_size()
    offset = 0
    for n in names:
        size = tensors[n].numel()
        tensors[n] = flat[offset : offset + size].view_as(tensors[n]).clone()
        offset += size


class EWC:
    """Online diagonal-Fisher EWC state: Fisher sums and anchors, by parameter name.

    Args:
        lam: strength ``lambda`` of the penalty ``lambda/2 * sum F (theta - theta*)^2``.
        gamma: decay of the earlier tasks' Fisher in the running sum (1.0 = plain sum of
            all tasks, 0.0 = only the last task).
        fisher_max_batches: cap on the number of batches used to estimate the Fisher
            (``None`` = all batches given).

    The state is empty until the first ``consolidate`` (or ``load``); an empty EWC has a
    zero penalty and adds no gradient.
    """

    def __init__(
        self, lam: float = 1.0, gamma: float = 1.0, fisher_max_batches: int | None = None
    ) -> None:
        if lam < 0:
            raise ValueError(f"lam: must be >= 0, got {lam}; use 0 to switch the penalty off")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma: must lie in [0, 1], got {gamma}")
        if fisher_max_batches is not None and fisher_max_batches < 1:
            raise ValueError(f"fisher_max_batches: must be >= 1 or None, got {fisher_max_batches}")
        self.lam = float(lam)
        self.gamma = float(gamma)
        self.fisher_max_batches = fisher_max_batches
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchors: dict[str, torch.Tensor] = {}
        self.num_tasks = 0

    # ------------------------------------------------------------------ estimation
    def estimate_fisher(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        loss_fn: LossFn = default_loss_fn,
        *,
        max_batches: int | None = None,
        progress: bool = False,
        all_reduce: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher: mean over batches of ``grad(loss) ** 2`` (fp32).

        At most ``max_batches`` (default: ``fisher_max_batches``) batches are used. The
        model's existing ``.grad`` values and its train/eval mode are restored
        afterwards, so this can run in the middle of a training loop.

        Under ``torch.distributed`` (DDP, FSDP, DeepSpeed launched by torchrun or
        accelerate), each rank estimates the Fisher on its own batches and, with
        ``all_reduce``, the ranks' Fishers are averaged (``all_reduce`` + divide by the
        world size), so every rank ends with the same Fisher over all ranks' data and
        the same penalty. Pass the *unwrapped* model: a backward through the DDP wrapper
        would average gradients before they are squared (the square of the mean is not
        the mean of the squares).
        """
        limit = self.fisher_max_batches if max_batches is None else max_batches
        params = trainable_parameters(model)
        if not params:
            raise ValueError("model: has no trainable parameters, so EWC has nothing to protect")
        saved_grads = {
            n: (None if p.grad is None else p.grad.detach().clone()) for n, p in params.items()
        }
        was_training = model.training
        model.eval()  # no dropout: the Fisher of the deterministic model
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        count = 0
        iterator: Iterable[Any] = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="EWC Fisher", total=limit, leave=False)
        try:
            for batch in iterator:
                if limit is not None and count >= limit:
                    break
                for p in params.values():
                    p.grad = None
                with torch.enable_grad():
                    loss = loss_fn(model, batch)
                    loss.backward()
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n] += p.grad.detach().float() ** 2
                count += 1
        finally:
            for n, p in params.items():
                p.grad = saved_grads[n]
            model.train(was_training)
        if count == 0:
            raise ValueError("batches: is empty, so the Fisher cannot be estimated")
        fisher = {n: f / count for n, f in fisher.items()}
        if all_reduce:
            _average_over_ranks(fisher)
        for n, f in fisher.items():
            if not torch.isfinite(f).all():
                raise ValueError(
                    f"fisher: {n} holds NaN/inf (the loss or its gradient diverged); lower "
                    "the learning rate"
                )
        return fisher

    def consolidate(
        self,
        model: nn.Module,
        batches: Iterable[Any] | None = None,
        loss_fn: LossFn = default_loss_fn,
        *,
        fisher: Mapping[str, torch.Tensor] | None = None,
        max_batches: int | None = None,
        progress: bool = False,
    ) -> dict[str, torch.Tensor]:
        """End of a task: fold this task's Fisher into the running sum and re-anchor.

        Give either ``batches`` (and ``loss_fn``) to estimate the Fisher, or a precomputed
        ``fisher``. Returns this task's Fisher.
        """
        if fisher is None:
            if batches is None:
                raise ValueError("batches: give the task's batches or a precomputed fisher")
            fisher = self.estimate_fisher(
                model, batches, loss_fn, max_batches=max_batches, progress=progress
            )
        params = trainable_parameters(model)
        missing = sorted(set(params) - set(fisher))
        if missing:
            raise ValueError(f"fisher: has no entry for trainable parameter(s) {missing[:3]}")
        for n, p in params.items():
            f = fisher[n].detach().to(device=p.device, dtype=torch.float32)
            old = self.fisher.get(n)
            self.fisher[n] = f.clone() if old is None else self.gamma * old.to(f.device) + f
            self.anchors[n] = p.detach().to(torch.float32).clone()
        self.num_tasks += 1
        return dict(fisher)

    # ------------------------------------------------------------------ penalty
    def _pairs(self, model: nn.Module):
        for n, p in trainable_parameters(model).items():
            f = self.fisher.get(n)
            if f is None:
                continue
            if f.shape != p.shape:
                raise ValueError(
                    f"{n}: EWC state has shape {tuple(f.shape)} but the parameter has "
                    f"{tuple(p.shape)}; the EWC state belongs to another model"
                )
            yield n, p, f.to(p.device), self.anchors[n].to(p.device)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``lambda/2 * sum F (theta - theta*)^2`` as a scalar fp32 tensor with a graph."""
        device = next(model.parameters()).device
        total = torch.zeros((), device=device, dtype=torch.float32)
        if self.lam == 0.0:
            return total
        for _, p, f, a in self._pairs(model):
            total = total + (f * (p.float() - a) ** 2).sum().to(device)
        return 0.5 * self.lam * total

    @torch.no_grad()
    def penalty_grad_(self, model: nn.Module) -> float:
        """Add ``lambda * F * (theta - theta*)`` to each protected ``param.grad``.

        Use it where the loss cannot be changed (a ``TrainerCallback``): call it after
        the task loss's backward and before ``optimizer.step()``. Returns the penalty's
        value (for logging). A missing ``.grad`` is created.
        """
        value = 0.0
        if self.lam == 0.0:
            return value
        for _, p, f, a in self._pairs(model):
            diff = p.float() - a
            value += float((f * diff * diff).sum())
            g = (self.lam * f * diff).to(p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g.to(p.grad.dtype))
        return 0.5 * self.lam * value

    def distance(self, model: nn.Module) -> float:
        """Plain L2 distance ``||theta - theta*||`` over the protected parameters."""
        with torch.no_grad():
            sq = sum(float(((p.float() - a) ** 2).sum()) for _, p, _, a in self._pairs(model))
        return sq**0.5

    @property
    def is_empty(self) -> bool:
        """True before the first task has been consolidated."""
        return not self.fisher

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Tensors and settings, for ``torch.save`` or ``save``."""
        return {
            "lam": self.lam,
            "gamma": self.gamma,
            "num_tasks": self.num_tasks,
            "fisher": {n: t.detach().cpu() for n, t in self.fisher.items()},
            "anchors": {n: t.detach().cpu() for n, t in self.anchors.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (settings included)."""
        self.lam = float(state["lam"])
        self.gamma = float(state["gamma"])
        self.num_tasks = int(state["num_tasks"])
        self.fisher = {n: t.float().clone() for n, t in state["fisher"].items()}
        self.anchors = {n: t.float().clone() for n, t in state["anchors"].items()}
        if set(self.fisher) != set(self.anchors):
            raise ValueError("state: fisher and anchors name different parameters")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the state as one safetensors file (atomic, see :mod:`secura_plugins._fs`)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"fisher.{n}": t.contiguous() for n, t in self.state_dict()["fisher"].items()}
        tensors.update(
            {f"anchor.{n}": t.contiguous() for n, t in self.state_dict()["anchors"].items()}
        )
        meta = {
            "format": "secura-ewc-1",
            "lam": repr(self.lam),
            "gamma": repr(self.gamma),
            "num_tasks": str(self.num_tasks),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EWC:
        """Read a file written by ``save``."""
        from safetensors import safe_open

        fisher: dict[str, torch.Tensor] = {}
        anchors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != "secura-ewc-1":
                raise ValueError(f"{path}: not an EWC state file written by EWC.save")
            for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                kind, name = key.split(".", 1)
                (fisher if kind == "fisher" else anchors)[name] = fh.get_tensor(key)
        ewc = cls(lam=float(meta["lam"]), gamma=float(meta["gamma"]))
        state = {"lam": ewc.lam, "gamma": ewc.gamma, "num_tasks": int(meta["num_tasks"])}
        ewc.load_state_dict({**state, "fisher": fisher, "anchors": anchors})
        return ewc

    def __repr__(self) -> str:
        return (
            f"EWC(lam={self.lam}, gamma={self.gamma}, tasks={self.num_tasks}, "
            f"params={len(self.fisher)})"
        )
