"""Explicit regularisation: which parameters, L1 / L2 penalties, max-norm constraints.

Reading order: `unwrap` and `parameter_kind` (what a parameter is), `select_parameters` (which ones a
regulariser touches), the penalty functions, then `Regularizer`, which the training loop holds.

**Explicit L2 is not weight decay.** An L2 penalty `l2 / 2 * sum(w^2)` is part of the loss, so its
gradient `l2 * w` goes through the optimizer with the data gradient. Under SGD that is the same update as
weight decay (`torch.optim.SGD(weight_decay=l2)` computes exactly this). Under Adam it is not: Adam
divides every gradient by its running RMS, so the pull towards zero is rescaled per parameter (weights
with large data gradients are barely regularised) - this is what `torch.optim.Adam(weight_decay=...)`
does. Decoupled weight decay (AdamW, `train.weight_decay`) instead shrinks the weights directly,
`w -= lr * weight_decay * w`, outside the adaptive update, which is why it regularises adaptive
optimizers more predictably (Loshchilov & Hutter, 2019). bigmodel keeps both: `train.weight_decay` is
AdamW's decoupled decay, `train.l2` is the explicit penalty; tests/nn/test_regularizers.py shows the two
give different Adam updates.

**Max-norm** (Srebro & Shraibman 2005; used with dropout by Srivastava et al. 2014) is a constraint, not a
penalty: after each optimizer step every row of a selected weight (dim 0: in an nn.Linear, the incoming
weights of one output unit) or column (dim 1) whose L2 norm exceeds `max_norm` is scaled back onto the
ball, as `torch.renorm` does.

Models wrapped by DDP or torch.compile are unwrapped first, so parameter names are the module's own;
FSDP2 (`fully_shard`) keeps the module and shards parameters as DTensors, which these element-wise and
reduction ops handle (values are gathered for logging only).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from bigmodel.config import PARAM_KINDS, RegularizationConfig, TrainConfig

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself, without DDP / DataParallel (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _is_norm(module: nn.Module) -> bool:
    # torch's BatchNorm*, LayerNorm, GroupNorm, RMSNorm, InstanceNorm*, and custom ones such as GPT's LayerNorm
    return "Norm" in type(module).__name__


def parameter_kinds(model: nn.Module) -> dict[str, tuple[str, list[str], nn.Parameter]]:
    """Every distinct parameter as {first name: (kind, all its names, parameter)}, in `named_parameters` order.

    Kinds: "embedding" (owned by an nn.Embedding, even when tied to an output layer, as GPT's lm_head
    is), "norm" (any parameter of a normalisation layer), "bias" (other parameters named `bias`),
    "matrix" (other tensors with >= 2 dims: Linear and conv weights) and "other" (the rest, e.g.
    learned scalars).
    """
    model = unwrap(model)
    names: dict[int, list[str]] = {}
    owners: dict[int, list[nn.Module]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False):
            names.setdefault(id(p), []).append(f"{mod_name}.{local}" if mod_name else local)
            owners.setdefault(id(p), []).append(module)
    out: dict[str, tuple[str, list[str], nn.Parameter]] = {}
    for name, p in model.named_parameters():  # distinct tensors, first name, in the optimizer's order
        mods = owners[id(p)]
        if any(isinstance(m, _EMBEDDINGS) for m in mods):
            kind = "embedding"
        elif any(_is_norm(m) for m in mods):
            kind = "norm"
        elif name.rsplit(".", 1)[-1] == "bias":
            kind = "bias"
        elif p.dim() >= 2:
            kind = "matrix"
        else:
            kind = "other"
        out[name] = (kind, sorted(set(names[id(p)]), key=names[id(p)].index), p)
    return out


def select_parameters(
    model: nn.Module,
    kinds: Iterable[str] = ("matrix",),
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters whose kind is in `kinds` or whose name matches an `include` glob, minus those
    matching an `exclude` glob (a tied parameter matches through any of its names).

    A glob that matches no parameter at all is an error (a typo would otherwise silently do nothing).
    """
    kinds, include, exclude = list(kinds), list(include), list(exclude)
    bad = [k for k in kinds if k not in PARAM_KINDS]
    if bad:
        raise ValueError(f"unknown parameter kind(s) {bad}; choose from {', '.join(PARAM_KINDS)}")
    table = parameter_kinds(model)

    def matches(pattern: str, all_names: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, pattern) for n in all_names)

    for what, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(matches(pattern, n) for _, n, _ in table.values()):
                example = ", ".join(list(table)[:3])
                raise ValueError(f"{what} pattern {pattern!r} matches no parameter; names look like {example}")
    chosen = []
    for name, (kind, all_names, p) in table.items():
        wanted = kind in kinds or any(matches(g, all_names) for g in include)
        if wanted and p.requires_grad and not any(matches(g, all_names) for g in exclude):
            chosen.append((name, p))
    return chosen


def _global(t: torch.Tensor) -> torch.Tensor:
    """A DTensor reduction (FSDP2) as an ordinary tensor holding the value over all shards."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def l1_penalty(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """sum |w| over all elements of `params` (fp32, differentiable; 0 for no parameters)."""
    terms = [_global(p.float().abs().sum()) for p in params]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def l2_penalty(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """sum w^2 / 2 over all elements of `params` (so its gradient is w); fp32, differentiable."""
    terms = [_global(p.float().pow(2).sum()) for p in params]
    return torch.stack(terms).sum() / 2 if terms else torch.zeros(())


@torch.no_grad()
def max_norm_(weight: torch.Tensor, max_norm: float, dim: int = 0, eps: float = 1e-7) -> torch.Tensor:
    """In place: rescale each slice `weight.select(dim, i)` whose L2 norm exceeds max_norm to norm max_norm.

    Equal to `weight.copy_(torch.renorm(weight, 2, dim, max_norm))` (same eps), written with a norm
    reduction and a broadcast multiply, which sharded DTensors support.
    """
    if not 0 <= dim < weight.dim():
        raise ValueError(f"max-norm dim {dim} does not exist in a tensor of shape {tuple(weight.shape)}")
    other = [d for d in range(weight.dim()) if d != dim]
    norms = torch.linalg.vector_norm(weight.float(), dim=other, keepdim=True) if other else weight.float().abs()
    scale = torch.where(norms > max_norm, max_norm / (norms + eps), torch.ones_like(norms))
    return weight.mul_(scale.to(weight.dtype))


class Regularizer:
    """L1 / L2 penalties and max-norm constraints on the parameters a RegularizationConfig selects.

    In a training step (see docs/generalization.md):

        loss = data_loss + reg.penalty(model)[0]     # or, after backward: reg.add_penalty_gradients(model)
        loss.backward(); optimizer.step()
        reg.apply_max_norm(model)

    `penalty` returns the differentiable total and its parts for logging (kept apart from the data
    loss). `add_penalty_gradients` adds the same gradient (l1 * sign(w) + l2 * w) straight to `.grad`
    once per optimizer step: the form for the training loop, since it counts the penalty once however many
    micro-batches are accumulated, needs no autograd graph, and works on FSDP2's sharded parameters.
    """

    def __init__(self, config: RegularizationConfig) -> None:
        self.config = config

    @classmethod
    def from_train_config(cls, cfg: TrainConfig) -> Regularizer:
        """From the `train.l1`, `train.l2`, `train.max_norm*`, `train.regularize*` fields."""
        return cls(cfg.regularization())

    @property
    def has_penalty(self) -> bool:
        return self.config.l1 > 0 or self.config.l2 > 0

    @property
    def active(self) -> bool:
        """False when every term is off: the loop can skip all calls."""
        return self.has_penalty or self.config.max_norm > 0

    def parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        c = self.config
        return select_parameters(model, c.kinds, c.include, c.exclude)

    def penalty(self, model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(l1 * sum|w| + l2/2 * sum w^2, {"l1": term, "l2": term}) - the parts detached, only the enabled ones."""
        params = [p for _, p in self.parameters(model)] if self.has_penalty else []
        terms = {}
        if self.config.l1 > 0:
            terms["l1"] = self.config.l1 * l1_penalty(params)
        if self.config.l2 > 0:
            terms["l2"] = self.config.l2 * l2_penalty(params)
        total = torch.stack(list(terms.values())).sum() if terms else torch.zeros(())
        return total, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def add_penalty_gradients(self, model: nn.Module, with_values: bool = False) -> dict[str, float]:
        """Add the penalty's gradient (l1 * sign(w) + l2 * w) to every selected parameter's `.grad`, after
        the backward passes and before clipping and optimizer.step().

        With `with_values` it also returns the penalty terms for logging (a host sync, and under FSDP a
        small all-reduce per parameter: ask on logging steps only, on every rank); otherwise {}.
        """
        if not self.has_penalty:
            return {}
        for _, p in self.parameters(model):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.config.l1 > 0:
                p.grad.add_(torch.sign(p), alpha=self.config.l1)
            if self.config.l2 > 0:
                p.grad.add_(p, alpha=self.config.l2)
        return {k: float(v) for k, v in self.penalty(model)[1].items()} if with_values else {}

    @torch.no_grad()
    def apply_max_norm(self, model: nn.Module) -> int:
        """After optimizer.step(): renormalise rows/columns of the selected weights; returns how many
        parameters were visited (0 when max_norm is off)."""
        if self.config.max_norm <= 0:
            return 0
        params = self.parameters(model)
        for name, p in params:
            if p.dim() <= self.config.max_norm_dim:
                raise ValueError(
                    f"max_norm_dim={self.config.max_norm_dim} does not exist in {name} (shape {tuple(p.shape)}); "
                    "exclude it from regularisation or use max_norm_dim=0"
                )
            max_norm_(p, self.config.max_norm, self.config.max_norm_dim)
        return len(params)

    def describe(self, model: nn.Module) -> str:
        """One line for the training log: what is on, and on how many tensors / values."""
        if not self.active:
            return "regularisation: off"
        c, params = self.config, self.parameters(model)
        terms = [f"{k}={v:g}" for k, v in (("l1", c.l1), ("l2", c.l2), ("max_norm", c.max_norm)) if v > 0]
        n = sum(p.numel() for _, p in params)
        return f"regularisation: {', '.join(terms)} on {len(params)} tensors ({n:,} values; kinds {', '.join(c.kinds)})"
