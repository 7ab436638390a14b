"""Connection patterns: how a layer's m inputs reach its k outputs, each as a reusable layer.

A large model is defined by how its inputs connect to its outputs. Each layer below states its
parameter count as a formula (`n_params`), which the tests check against the real count:

| layer         | what connects to what                                        | parameters (with bias)       |
| ------------- | ------------------------------------------------------------ | ---------------------------- |
| Dense         | every input to every output                                  | m*k + k                      |
| SecondOrder   | + pairwise products of inputs (quadratic form per output)    | full: 2*m*k + m*k*k + k      |
|               |   factorized (rank r, factorization machine)                 | m*k + m*k*r + k              |
| Interactive   | g input groups, each to its own k/g outputs (+ g x g mixing) | m*k/g + k (+ g*g)            |
| SparseLinear  | a fixed or learned mask keeping nnz of the m*k connections   | nnz + k                      |
| SharedLinear  | edges tied to n_shared values (weight sharing between edges) | n_shared + k                 |

plus `tie` (one tensor for several layers, counted and saved once) and `SharedExtractor` (one feature
extractor applied to every input of a multi-input model, then a merge). docs/zoo.md says when to use each.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ----- dense -------------------------------------------------------------------------------------------


class Dense(nn.Linear):
    """The fully connected m x k layer: y = x W^T + b. Every input reaches every output."""

    @staticmethod
    def n_params(m: int, k: int, bias: bool = True) -> int:
        return m * k + (k if bias else 0)


# ----- second order ------------------------------------------------------------------------------------


class SecondOrder(nn.Module):
    """y_j = (W x + b)_j + q_j(x): a dense layer plus a quadratic form of the inputs per output.

    Full form (rank=0): the inputs meet a fixed set of k hidden units z = x B (B: m x k) through the
    pairwise products x_a z_c, each weighted per output: q_j = sum_a sum_c A[a, j, c] x_a z_c
    (A: m x k x k), i.e. q_j = x^T (A_j B^T) x with a rank-k interaction matrix. 2*m*k + m*k*k + k params.

    Factorized form (rank=r): a factorization machine per output, q_j = sum_{a<b} <V[a, j], V[b, j]> x_a x_b
    (V: m x k x r), computed as 1/2 sum_f [(sum_a V[a,j,f] x_a)^2 - sum_a V[a,j,f]^2 x_a^2].
    m*k + m*k*r + k params: O(m*k) for a fixed rank.

    Neither form materialises the m x m interaction matrix: the full form costs O(N*m*k*k) and the
    factorized one O(N*m*k*r). Use it when products of features matter (e.g. pixels that must co-occur):
    a few second-order units can replace many first-order ones.
    """

    def __init__(self, m: int, k: int, rank: int = 0, bias: bool = True) -> None:
        super().__init__()
        self.m, self.k, self.rank = m, k, rank
        self.linear = nn.Linear(m, k, bias=bias)
        if rank == 0:
            self.B = nn.Parameter(torch.randn(m, k) / math.sqrt(m))  # z = x B: unit-variance hidden units
            self.A = nn.Parameter(torch.randn(m, k, k) / math.sqrt(m * k))
        else:
            # s_f = sum_a V x_a has variance m*std^2; with std below, q has about unit variance at init
            std = 0.5 * (2.0 / rank) ** 0.25 / math.sqrt(m)
            self.V = nn.Parameter(torch.randn(m, k, rank) * std)

    @staticmethod
    def n_params(m: int, k: int, rank: int = 0, bias: bool = True) -> int:
        second = 2 * m * k + m * k * k if rank == 0 else m * k + m * k * rank
        return second + (k if bias else 0)

    def quadratic(self, x: torch.Tensor) -> torch.Tensor:
        """q(x): (N, m) -> (N, k), the second-order term alone."""
        N = x.shape[0]
        if self.rank == 0:
            z = x @ self.B  # (N, k): the hidden units the inputs interact with
            xa = (x @ self.A.reshape(self.m, -1)).view(N, self.k, self.k)  # (N, k_out, k_hidden)
            return (xa * z[:, None, :]).sum(-1)  # (N, k)
        V = self.V.reshape(self.m, -1)  # (m, k*r)
        s = (x @ V).view(N, self.k, self.rank)  # (N, k, r): sum_a V[a,j,f] x_a
        s2 = ((x * x) @ (V * V)).view(N, self.k, self.rank)  # (N, k, r): sum_a V[a,j,f]^2 x_a^2
        return 0.5 * (s * s - s2).sum(-1)  # (N, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.m)  # (N, m)
        return (self.linear(flat) + self.quadratic(flat)).view(*lead, self.k)

    def extra_repr(self) -> str:
        return f"m={self.m}, k={self.k}, rank={self.rank} ({'full' if self.rank == 0 else 'factorized'})"


# ----- interactive (grouped) ---------------------------------------------------------------------------


class Interactive(nn.Module):
    """Block connections: the m inputs split into `groups` groups, each connected only to its own k/g outputs.

    y_i = W_i x_i + b_i for group i (W_i: m_i x l with l = k/g), then optionally a learned g x g mixing of
    the groups, y[:, i, u] <- sum_j M[i, j] y[:, j, u] (M starts as the identity), so that information can
    cross groups at g*g parameters instead of a dense layer's m*k. Parameters: m*k/g + k (+ g*g).
    Use it when the inputs come in blocks that mostly interact within themselves (channels, sensors,
    fields of a record); it is the grouped convolution / grouped linear layer.
    """

    def __init__(self, m: int, k: int, groups: int, mix: bool = True, bias: bool = True) -> None:
        super().__init__()
        if k % groups:
            raise ValueError(f"Interactive: k={k} outputs must be a multiple of groups={groups}")
        if groups > m:
            raise ValueError(f"Interactive: groups={groups} is more than the m={m} inputs")
        self.m, self.k, self.groups = m, k, groups
        self.sizes = [len(part) for part in torch.arange(m).tensor_split(groups)]  # as even as possible
        self.width = k // groups
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(self.width, size).uniform_(-1, 1) / math.sqrt(size)) for size in self.sizes]
        )
        self.bias = nn.Parameter(torch.zeros(k)) if bias else None
        self.mix = nn.Parameter(torch.eye(groups)) if mix else None

    @staticmethod
    def n_params(m: int, k: int, groups: int, mix: bool = True, bias: bool = True) -> int:
        return m * k // groups + (k if bias else 0) + (groups * groups if mix else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(self.sizes, dim=-1)  # g tensors (..., m_i)
        y = torch.stack([part @ w.t() for part, w in zip(parts, self.weights, strict=True)], dim=-2)  # (..., g, l)
        if self.mix is not None:
            y = torch.einsum("ij,...jl->...il", self.mix, y)  # (..., g, l)
        y = y.flatten(-2)  # (..., k)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"m={self.m}, k={self.k}, groups={self.groups}, mix={self.mix is not None}"


# ----- sparse ------------------------------------------------------------------------------------------


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix over our own (valid by construction) index buffers; silences torch's "beta" notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _CSRLinear(torch.autograd.Function):
    """y = x W^T for a CSR weight W (k x m) given by its values; gradients for x and for the values only.

    Forward and the input gradient are sparse x dense products (W and its transpose, whose CSR layout is
    precomputed); the value gradient is (dy^T x) sampled at W's pattern (`torch.sparse.sampled_addmm`),
    so no dense k x m matrix is ever formed. The products run outside autocast, in the values' dtype (on
    GPUs too): sparse products have no bf16 kernel on CPUs, where autocast picks bf16 if it is native.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, layer: SparseLinear) -> torch.Tensor:
        ctx.save_for_backward(x, values)
        ctx.layer = layer
        W = _csr(layer.crow, layer.col, values, (layer.k, layer.m))
        with torch.autocast(x.device.type, enabled=False):
            return (W @ x.t()).t()  # (N, k)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, values = ctx.saved_tensors
        layer: SparseLinear = ctx.layer
        dx = dvalues = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                Wt = _csr(layer.t_crow, layer.t_col, values[layer.t_perm], (layer.m, layer.k))
                dx = (Wt @ dy.t()).t()  # (N, m)
            if ctx.needs_input_grad[1]:
                pattern = _csr(layer.crow, layer.col, torch.zeros_like(values), (layer.k, layer.m))
                dvalues = torch.sparse.sampled_addmm(pattern, dy.t().contiguous(), x.contiguous(), beta=0.0).values()
        return dx, dvalues, None


class SparseLinear(nn.Module):
    """A k x m linear layer that stores and multiplies only the nnz connections of its mask (CSR format).

    Memory is nnz values + nnz column indices (+ the transposed layout for the backward pass) instead of
    m*k values, and time scales with nnz: below roughly 10% density it beats the dense layer on CPU
    (benchmarks/connections.py measures where). The mask is fixed at construction: random with the same
    fan-in for every output (`density`), given (`from_mask`), or learned by a dense layer and kept by
    magnitude (`from_dense`). Parameters: nnz + k.
    """

    crow: torch.Tensor
    col: torch.Tensor
    t_crow: torch.Tensor
    t_col: torch.Tensor
    t_perm: torch.Tensor

    def __init__(
        self,
        m: int,
        k: int,
        density: float = 0.1,
        bias: bool = True,
        *,
        seed: int = 0,
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < density <= 1.0:
            raise ValueError(f"SparseLinear: density={density} must be in (0, 1]")
        self.m, self.k = m, k
        if mask is None:
            fan_in = self.fan_in(m, density)
            gen = torch.Generator().manual_seed(seed)
            mask = torch.zeros(k, m, dtype=torch.bool)
            cols = torch.rand(k, m, generator=gen).argsort(dim=1)[:, :fan_in]  # (k, fan_in) distinct inputs
            mask.scatter_(1, cols, True)
        if mask.shape != (k, m) or not mask.any():
            raise ValueError(f"SparseLinear: the mask must be a non-empty ({k}, {m}) boolean tensor")
        self._set_pattern(mask.bool())
        fan = max(1.0, self.nnz / k)
        self.values = nn.Parameter(torch.empty(self.nnz).uniform_(-1, 1) / math.sqrt(fan))
        self.bias = nn.Parameter(torch.zeros(k)) if bias else None

    @staticmethod
    def fan_in(m: int, density: float) -> int:
        """Inputs per output for a random mask of this density (at least one)."""
        return max(1, round(density * m))

    @staticmethod
    def n_params(m: int, k: int, density: float, bias: bool = True) -> int:
        return k * SparseLinear.fan_in(m, density) + (k if bias else 0)

    def _set_pattern(self, mask: torch.Tensor) -> None:
        rows, cols = mask.nonzero(as_tuple=True)  # row-major order: CSR order
        self.nnz = int(rows.numel())
        crow = torch.zeros(self.k + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(rows, minlength=self.k).cumsum(0)
        t_perm = (cols * self.k + rows).argsort()  # the same entries ordered by (column, row): CSR of W^T
        t_crow = torch.zeros(self.m + 1, dtype=torch.int64)
        t_crow[1:] = torch.bincount(cols, minlength=self.m).cumsum(0)
        # int32 indices (half the memory of int64) while they fit; saved with the weights (persistent
        # buffers), so a loaded model has the pattern it was trained with.
        index = torch.int32 if max(self.nnz, self.m, self.k) < 2**31 else torch.int64
        self.register_buffer("crow", crow.to(index))
        self.register_buffer("col", cols.to(index))
        self.register_buffer("t_crow", t_crow.to(index))
        self.register_buffer("t_col", rows[t_perm].to(index))
        self.register_buffer("t_perm", t_perm.to(index))

    def index_bytes(self) -> int:
        """Memory of the sparsity pattern (both CSR layouts), in bytes."""
        return sum(b.numel() * b.element_size() for b in (self.crow, self.col, self.t_crow, self.t_col, self.t_perm))

    @classmethod
    def from_mask(
        cls, mask: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> SparseLinear:
        """A layer with this (k, m) mask; `weight` (k, m) and `bias` (k,) give the initial values if passed."""
        k, m = mask.shape
        layer = cls(m, k, mask=mask)
        with torch.no_grad():
            if weight is not None:
                layer.values.copy_(weight[mask.bool()])
            if bias is not None:
                assert layer.bias is not None
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense(cls, linear: nn.Linear, density: float) -> SparseLinear:
        """A learned mask: keep the `density` fraction of `linear`'s weights with the largest magnitude."""
        w = linear.weight.detach()
        keep = max(1, round(density * w.numel()))
        threshold = w.abs().flatten().topk(keep).values[-1]
        return cls.from_mask(w.abs() >= threshold, w, None if linear.bias is None else linear.bias.detach())

    def mask(self) -> torch.Tensor:
        """The (k, m) boolean connection mask."""
        return self._dense(torch.ones_like(self.values)).bool()

    def to_dense(self) -> torch.Tensor:
        """The (k, m) weight with zeros where there is no connection."""
        return self._dense(self.values.detach())

    def _dense(self, values: torch.Tensor) -> torch.Tensor:
        return _csr(self.crow, self.col, values, (self.k, self.m)).to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.m)  # (N, m)
        y = _CSRLinear.apply(flat.to(self.values.dtype), self.values, self)  # (N, k)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.k)

    def extra_repr(self) -> str:
        return f"m={self.m}, k={self.k}, nnz={self.nnz} (density {self.nnz / (self.m * self.k):.3f})"


# ----- weight sharing ----------------------------------------------------------------------------------


class SharedLinear(nn.Module):
    """A k x m layer whose edges share n_shared values: W[i, j] = shared[index[i, j]].

    Tied edges read the same parameter, so their gradients add up and one optimizer update moves all of
    them alike (weight sharing within a layer, as a convolution shares its kernel across positions).
    `index` chooses the ties; `hashed` ties edges at random (HashedNets). Parameters: n_shared + k.
    """

    index: torch.Tensor

    def __init__(self, index: torch.Tensor, n_shared: int | None = None, bias: bool = True) -> None:
        super().__init__()
        if index.dim() != 2 or index.min() < 0:
            raise ValueError("SharedLinear: index must be a (k, m) tensor of non-negative slot numbers")
        self.k, self.m = index.shape
        n = int(index.max()) + 1 if n_shared is None else n_shared
        self.register_buffer("index", index.long().clone())
        self.shared = nn.Parameter(torch.empty(n).uniform_(-1, 1) / math.sqrt(self.m))
        self.bias = nn.Parameter(torch.zeros(self.k)) if bias else None

    @classmethod
    def hashed(cls, m: int, k: int, n_shared: int, bias: bool = True, seed: int = 0) -> SharedLinear:
        gen = torch.Generator().manual_seed(seed)
        return cls(torch.randint(0, n_shared, (k, m), generator=gen), n_shared, bias)

    @staticmethod
    def n_params(n_shared: int, k: int, bias: bool = True) -> int:
        return n_shared + (k if bias else 0)

    def weight(self) -> torch.Tensor:
        return self.shared[self.index]  # (k, m): a gather, so gradients of tied edges accumulate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


def tie(module: nn.Module, source: str, *targets: str) -> None:
    """Make each parameter named in `targets` the very tensor named `source` (e.g. "encoder.wte.weight").

    The tied layers then hold one Parameter: `parameters()` lists it once, `unique_state_dict` saves it
    once, and every update (whose gradient sums over the layers using it) moves all of them together.
    """
    shared = module.get_parameter(source)
    for target in targets:
        owner_name, _, attr = target.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        old = getattr(owner, attr)
        if not isinstance(old, nn.Parameter) or old.shape != shared.shape:
            found = tuple(old.shape) if isinstance(old, torch.Tensor) else type(old).__name__
            raise ValueError(f"tie: {target} ({found}) cannot share {source} {tuple(shared.shape)}")
        setattr(owner, attr, shared)


def tied_names(module: nn.Module) -> dict[str, str]:
    """{alias: source} for every parameter that is the same tensor as an earlier-registered one."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def unique_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor once (under its first name): what a model file should hold."""
    aliases = tied_names(module)
    return {k: v for k, v in module.state_dict().items() if k not in aliases}


# ----- shared feature extractor ------------------------------------------------------------------------


class SharedExtractor(nn.Module):
    """Multi-input feature extraction: one extractor applied to every input (or one per kind of input),
    then the per-input features merged for a head.

    Input (B, n, m): n inputs of m features. Each input i goes through `extractors[kinds[i]]` -> (B, n, d).
    Merges: "concat" (B, n*d; keeps which input said what), "sum" (B, d; order-free, any n), "attention"
    (B, d; a learned query scores each input's features, softmax over inputs, weighted sum). Sharing the
    extractor divides its parameters by the number of inputs of its kind and lets every input's examples
    train it.
    """

    def __init__(
        self,
        extractors: nn.Module | dict[str, nn.Module],
        features: int,
        merge: str = "concat",
        n_inputs: int | None = None,
        kinds: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if merge not in ("concat", "sum", "attention"):
            raise ValueError(f"SharedExtractor: merge={merge!r} is not concat | sum | attention")
        if merge == "concat" and n_inputs is None and kinds is None:
            raise ValueError("SharedExtractor: merge='concat' needs n_inputs (the output width depends on it)")
        self.extractors = nn.ModuleDict(extractors if isinstance(extractors, dict) else {"input": extractors})
        self.kinds = list(kinds) if kinds is not None else None
        if self.kinds is not None:
            unknown = sorted(set(self.kinds) - set(self.extractors))
            if unknown:
                raise ValueError(f"SharedExtractor: kinds {unknown} have no extractor")
            n_inputs = len(self.kinds)
        elif len(self.extractors) != 1:
            raise ValueError("SharedExtractor: several extractors need `kinds` (which input uses which)")
        self.n_inputs, self.features, self.merge = n_inputs, features, merge
        self.query = nn.Parameter(torch.zeros(features)) if merge == "attention" else None

    @property
    def out_features(self) -> int:
        return self.features * (self.n_inputs or 1) if self.merge == "concat" else self.features

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, m) -> (B, n, d): every input through its kind's extractor."""
        B, n, m = x.shape
        if self.n_inputs is not None and n != self.n_inputs:
            raise ValueError(f"SharedExtractor: expected {self.n_inputs} inputs, got {n}")
        if self.kinds is None:
            only = next(iter(self.extractors.values()))
            return only(x.reshape(B * n, m)).view(B, n, -1)  # one batched pass over all inputs
        return torch.stack([self.extractors[kind](x[:, i]) for i, kind in enumerate(self.kinds)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.extract(x)  # (B, n, d)
        if self.merge == "concat":
            return feats.flatten(1)  # (B, n*d)
        if self.merge == "sum":
            return feats.sum(1)  # (B, d)
        assert self.query is not None
        scores = feats @ self.query / math.sqrt(self.features)  # (B, n)
        return (scores.softmax(-1).unsqueeze(-1) * feats).sum(1)  # (B, d)


# ----- a hidden layer by pattern name (models/mlp.py) --------------------------------------------------


def connection(
    kind: str,
    m: int,
    k: int,
    *,
    rank: int = 0,
    groups: int = 4,
    mix: bool = True,
    density: float = 0.25,
    bias: bool = True,
    seed: int = 0,
) -> nn.Module:
    """An m -> k layer of the named pattern: dense | second-order | interactive | sparse."""
    if kind == "dense":
        return Dense(m, k, bias=bias)
    if kind == "second-order":
        return SecondOrder(m, k, rank, bias)
    if kind == "interactive":
        return Interactive(m, k, groups, mix, bias)
    if kind == "sparse":
        return SparseLinear(m, k, density, bias, seed=seed)
    raise ValueError(f"unknown connection {kind!r}: dense | second-order | interactive | sparse")


def connection_params(
    kind: str, m: int, k: int, *, rank: int = 0, groups: int = 4, mix: bool = True, density: float = 0.25
) -> int:
    """The parameter formula of `connection(kind, m, k, ...)` (with bias)."""
    if kind == "dense":
        return Dense.n_params(m, k)
    if kind == "second-order":
        return SecondOrder.n_params(m, k, rank)
    if kind == "interactive":
        return Interactive.n_params(m, k, groups, mix)
    if kind == "sparse":
        return SparseLinear.n_params(m, k, density)
    raise ValueError(f"unknown connection {kind!r}: dense | second-order | interactive | sparse")
