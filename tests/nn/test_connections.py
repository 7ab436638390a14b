"""Connection layers: each equals its explicit (materialised) reference, and counts the parameters its formula says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from bigmodel.nn.connections import (
    Dense,
    Interactive,
    SecondOrder,
    SharedExtractor,
    SharedLinear,
    SparseLinear,
    connection,
    connection_params,
    tie,
    tied_names,
    unique_state_dict,
)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_dense_is_the_fully_connected_layer() -> None:
    torch.manual_seed(0)
    layer = Dense(7, 5)
    x = torch.randn(3, 7)
    assert_close(layer(x), x @ layer.weight.t() + layer.bias)
    assert n_params(layer) == Dense.n_params(7, 5) == 7 * 5 + 5
    assert n_params(Dense(7, 5, bias=False)) == Dense.n_params(7, 5, bias=False) == 35


@pytest.mark.parametrize("m, k", [(6, 4), (9, 3)])
def test_second_order_full_form_equals_its_rank_k_interaction_matrices(m: int, k: int) -> None:
    torch.manual_seed(0)
    layer = SecondOrder(m, k).double()
    x = torch.randn(5, m, dtype=torch.float64)
    # reference: materialise M_j = A[:, j, :] B^T (m x m) and evaluate x^T M_j x
    M = torch.einsum("ajc,bc->jab", layer.A, layer.B)  # (k, m, m)
    q = torch.einsum("na,jab,nb->nj", x, M, x)
    assert_close(layer(x), layer.linear(x) + q)
    assert n_params(layer) == SecondOrder.n_params(m, k) == 2 * m * k + m * k * k + k


@pytest.mark.parametrize("m, k, r", [(6, 4, 1), (10, 5, 2)])
def test_second_order_factorized_form_is_a_factorization_machine(m: int, k: int, r: int) -> None:
    torch.manual_seed(0)
    layer = SecondOrder(m, k, rank=r).double()
    x = torch.randn(5, m, dtype=torch.float64)
    # reference: sum over pairs a < b of <V[a, j], V[b, j]> x_a x_b, written out pair by pair
    q = torch.zeros(5, k, dtype=torch.float64)
    for a in range(m):
        for b in range(a + 1, m):
            q += (layer.V[a] * layer.V[b]).sum(-1) * (x[:, a] * x[:, b])[:, None]
    assert_close(layer(x), layer.linear(x) + q)
    assert n_params(layer) == SecondOrder.n_params(m, k, r) == m * k + m * k * r + k
    assert SecondOrder.n_params(m, k, r) < SecondOrder.n_params(m, k, 0)  # O(m k) instead of O(m k k)
    # gradients through the factorized trick are the analytic ones
    xg = x[:2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: layer.quadratic(t), (xg,))


def test_second_order_keeps_leading_dimensions() -> None:
    layer = SecondOrder(4, 3, rank=2)
    x = torch.randn(2, 5, 4)
    assert_close(layer(x), layer(x.reshape(10, 4)).view(2, 5, 3))


@pytest.mark.parametrize("m, k, groups, mix", [(8, 6, 2, False), (10, 6, 3, True), (30, 8, 4, True)])
def test_interactive_equals_a_block_diagonal_dense_layer(m: int, k: int, groups: int, mix: bool) -> None:
    torch.manual_seed(0)
    layer = Interactive(m, k, groups, mix=mix).double()
    with torch.no_grad():
        if layer.mix is not None:
            layer.mix.add_(0.3 * torch.randn_like(layer.mix))
        assert layer.bias is not None
        layer.bias.normal_()
    # reference: the dense weight with zeros outside the diagonal blocks (uneven input groups allowed)
    W = torch.zeros(k, m, dtype=torch.float64)
    width, start = k // groups, 0
    for i, w in enumerate(layer.weights):
        W[i * width : (i + 1) * width, start : start + w.shape[1]] = w
        start += w.shape[1]
    assert start == m
    x = torch.randn(4, m, dtype=torch.float64)
    y = (x @ W.t()).view(4, groups, width)
    if mix:
        assert layer.mix is not None
        y = torch.einsum("ij,njl->nil", layer.mix, y)
    assert_close(layer(x), y.reshape(4, k) + layer.bias)
    expected = m * k // groups + k + (groups * groups if mix else 0)
    assert n_params(layer) == Interactive.n_params(m, k, groups, mix) == expected


def test_interactive_refuses_groups_that_do_not_divide_the_outputs() -> None:
    with pytest.raises(ValueError, match="multiple of groups"):
        Interactive(8, 6, 4)


def _masked_reference(layer: SparseLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    W = layer.to_dense().clone().requires_grad_(True)
    return F.linear(x, W, layer.bias), W


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_sparse_layer_equals_the_masked_dense_layer_forward_and_backward(density: float) -> None:
    torch.manual_seed(0)
    layer = SparseLinear(40, 12, density, seed=3).double()
    fan_in = SparseLinear.fan_in(40, density)
    assert layer.mask().sum(1).tolist() == [fan_in] * 12  # every output has the same fan-in
    assert n_params(layer) == SparseLinear.n_params(40, 12, density) == 12 * fan_in + 12
    x = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref, W = _masked_reference(layer, x_ref)
    assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert x.grad is not None and x_ref.grad is not None and W.grad is not None
    assert_close(x.grad, x_ref.grad)
    assert_close(layer.values.grad, W.grad[layer.mask()])  # gradients only for the kept connections


def test_sparse_layer_under_bf16_autocast_computes_in_float32() -> None:
    """Training's default on CPUs with native bf16 is bf16 autocast; sparse products have no bf16 kernel."""
    torch.manual_seed(0)
    layer = SparseLinear(40, 12, 0.2, seed=3)
    x = torch.randn(6, 40, requires_grad=True)
    y_ref = layer(x)
    y_ref.sum().backward()
    x_grad, v_grad = x.grad, layer.values.grad
    x.grad = layer.values.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())  # (inputs from a bf16 layer before it)
        assert y.dtype == torch.float32
        assert_close(y, y_ref, rtol=1e-2, atol=2e-2)  # (the input rounded to bf16)
        y.sum().backward()
    assert layer.values.grad is not None and x.grad is not None
    assert_close(layer.values.grad, v_grad, rtol=1e-2, atol=2e-2)
    assert_close(x.grad, x_grad, rtol=1e-2, atol=2e-2)  # (through the bf16 cast)


def test_sparse_layer_gradcheck_and_leading_dimensions() -> None:
    torch.manual_seed(0)
    layer = SparseLinear(9, 4, 0.4).double()
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, v: _apply_values(layer, t, v), (x, layer.values.detach().clone().requires_grad_(True))
    )
    x3 = torch.randn(2, 5, 9, dtype=torch.float64)
    assert_close(layer(x3), layer(x3.reshape(10, 9)).view(2, 5, 4))


def _apply_values(layer: SparseLinear, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        layer.values.copy_(values.detach())
    from bigmodel.nn.connections import _CSRLinear

    return _CSRLinear.apply(x, values, layer)


def test_sparse_mask_learned_from_a_dense_layer_keeps_the_largest_weights() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(10, 8)
    sparse = SparseLinear.from_dense(dense, density=0.25)
    assert sparse.nnz == 20
    kept = sparse.mask()
    assert dense.weight.abs()[kept].min() >= dense.weight.abs()[~kept].max()
    assert_close(sparse.to_dense(), dense.weight.detach() * kept)
    x = torch.randn(3, 10)
    assert_close(sparse(x), F.linear(x, dense.weight * kept, dense.bias))


def test_sparse_layer_state_dict_carries_its_pattern() -> None:
    a = SparseLinear(20, 6, 0.2, seed=1)
    b = SparseLinear(20, 6, 0.2, seed=2)  # another random mask of the same size
    assert not torch.equal(a.mask(), b.mask())
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 20)
    assert torch.equal(b.mask(), a.mask())
    assert_close(b(x), a(x))


def test_shared_edges_accumulate_gradients_and_count_once() -> None:
    torch.manual_seed(0)
    layer = SharedLinear.hashed(m=6, k=5, n_shared=7).double()
    assert n_params(layer) == SharedLinear.n_params(7, 5) == 12
    x = torch.randn(4, 6, dtype=torch.float64)
    W = layer.weight().detach().clone().requires_grad_(True)
    g = torch.randn(4, 5, dtype=torch.float64)
    layer(x).backward(g)
    F.linear(x, W, layer.bias).backward(g)
    assert W.grad is not None and layer.shared.grad is not None
    # each shared value's gradient is the sum of its edges' gradients
    expected = torch.zeros(7, dtype=torch.float64).index_add_(0, layer.index.flatten(), W.grad.flatten())
    assert_close(layer.shared.grad, expected)


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_tied_layers_are_counted_saved_and_updated_once() -> None:
    torch.manual_seed(0)
    model = _TwoLayers()
    tie(model, "a.weight", "b.weight")
    assert model.a.weight is model.b.weight
    assert n_params(model) == 16 + 4 + 4  # one 4x4 matrix, two biases
    assert tied_names(model) == {"b.weight": "a.weight"}
    saved = unique_state_dict(model)
    assert sorted(saved) == ["a.bias", "a.weight", "b.bias"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert torch.equal(model.a.weight, model.b.weight)  # one tensor: updated consistently
    fresh = _TwoLayers()
    tie(fresh, "a.weight", "b.weight")
    missing, unexpected = fresh.load_state_dict(saved, strict=False)
    assert missing == ["b.weight"] and not unexpected  # only the alias, which is the same tensor
    assert torch.equal(fresh.b.weight, model.b.weight)
    with pytest.raises(ValueError, match="cannot share"):
        tie(model, "a.weight", "a.bias")


def test_shared_extractor_merges_equal_the_explicit_loops() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5)  # (B, n inputs, m)
    ext = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
    feats = torch.stack([ext(x[:, i]) for i in range(4)], 1)  # (B, n, d)
    concat = SharedExtractor(ext, 6, "concat", n_inputs=4)
    assert_close(concat(x), torch.cat([feats[:, i] for i in range(4)], 1))
    assert concat.out_features == 24
    assert_close(SharedExtractor(ext, 6, "sum")(x), feats.sum(1))
    att = SharedExtractor(ext, 6, "attention")
    with torch.no_grad():
        assert att.query is not None
        att.query.normal_()
        w = torch.softmax(feats @ att.query / 6**0.5, dim=1)  # (B, n)
    assert_close(att(x), (w[..., None] * feats).sum(1))
    # the extractor counts once however many inputs use it
    assert n_params(concat) == n_params(ext)


def test_shared_extractor_by_kind() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    layer = SharedExtractor({"a": a, "b": b}, 3, "concat", kinds=["a", "b", "a"])
    x = torch.randn(2, 3, 5)
    assert_close(layer(x), torch.cat([a(x[:, 0]), b(x[:, 1]), a(x[:, 2])], 1))
    with pytest.raises(ValueError, match="no extractor"):
        SharedExtractor({"a": a}, 3, "sum", kinds=["a", "c"])
    with pytest.raises(ValueError, match="expected 3 inputs"):
        layer(torch.randn(2, 4, 5))


@pytest.mark.parametrize(
    "kind, kw",
    [
        ("dense", {}),
        ("second-order", {"rank": 0}),
        ("second-order", {"rank": 3}),
        ("interactive", {"groups": 4}),
        ("interactive", {"groups": 2, "mix": False}),
        ("sparse", {"density": 0.1}),
    ],
)
def test_connection_factory_matches_the_formulas(kind: str, kw: dict) -> None:
    layer = connection(kind, 64, 16, **kw)
    assert n_params(layer) == connection_params(kind, 64, 16, **kw)
    assert layer(torch.randn(2, 64)).shape == (2, 16)


def test_gpt_embedding_and_output_are_one_tied_tensor() -> None:
    from conftest import tiny_gpt

    model = tiny_gpt()
    assert tied_names(model) == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in unique_state_dict(model)
    assert model.num_params(non_embedding=False) == n_params(model)  # counted once
