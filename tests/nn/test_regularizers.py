"""Regularisers: parameter selection, L1/L2 penalties against torch's weight decay, max-norm against torch.renorm."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

from bigmodel.config import ConfigError, RegularizationConfig, load_toml, resolve_config, to_toml
from bigmodel.nn.regularizers import (
    Regularizer,
    l1_penalty,
    l2_penalty,
    max_norm_,
    parameter_kinds,
    select_parameters,
    unwrap,
)
from bigmodel.train.optim import make_optimizer
from conftest import tiny_gpt


class Mixed(nn.Module):
    """One of each kind of parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv1d(6, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)
        self.ln = nn.LayerNorm(3)
        self.head = nn.Linear(3, 10, bias=False)
        self.temperature = nn.Parameter(torch.tensor(1.0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids).transpose(1, 2)  # (B, 6, T)
        x = self.bn(self.conv(x)).mean(-1)  # (B, 4)
        return self.head(self.ln(self.fc(x))) / self.temperature  # (B, 10)


def test_parameter_kinds_on_gpt_and_torch_layers() -> None:
    kinds = {name: kind for name, (kind, _, _) in parameter_kinds(tiny_gpt()).items()}
    assert kinds["transformer.wte.weight"] == "embedding"
    assert kinds["transformer.wpe.weight"] == "embedding"
    assert kinds["transformer.h.0.attn.c_attn.weight"] == "matrix"
    assert kinds["transformer.h.1.mlp.c_proj.weight"] == "matrix"
    assert kinds["transformer.h.0.attn.c_attn.bias"] == "bias"
    assert kinds["transformer.h.0.ln_1.weight"] == "norm"
    assert kinds["transformer.ln_f.bias"] == "norm"
    assert "lm_head.weight" not in kinds  # tied to wte: one tensor, listed once ...
    names = parameter_kinds(tiny_gpt())["transformer.wte.weight"][1]
    assert names == ["transformer.wte.weight", "lm_head.weight"]  # ... under both of its names

    mixed = {name: kind for name, (kind, _, _) in parameter_kinds(Mixed()).items()}
    assert mixed == {
        "emb.weight": "embedding",
        "conv.weight": "matrix",
        "conv.bias": "bias",
        "bn.weight": "norm",
        "bn.bias": "norm",
        "fc.weight": "matrix",
        "fc.bias": "bias",
        "ln.weight": "norm",
        "ln.bias": "norm",
        "head.weight": "matrix",
        "temperature": "other",
    }


def test_selection_defaults_globs_and_errors() -> None:
    model = tiny_gpt()
    default = [n for n, _ in select_parameters(model)]
    expected = [n for n, p in model.named_parameters() if p.dim() >= 2 and ".wte." not in n and ".wpe." not in n]
    assert default == expected and len(default) == 8  # 4 matrices per block: matrices only, no embeddings

    with_wte = [n for n, _ in select_parameters(model, include=["lm_head.weight"])]  # the tied name counts
    assert "transformer.wte.weight" in with_wte and len(with_wte) == 9
    no_proj = [n for n, _ in select_parameters(model, kinds=["matrix", "bias"], exclude=["*.c_proj.*"])]
    assert not any("c_proj" in n for n in no_proj) and "transformer.h.0.attn.c_attn.bias" in no_proj

    model.transformer.h[0].attn.c_attn.weight.requires_grad_(False)  # frozen parameters are never touched
    assert "transformer.h.0.attn.c_attn.weight" not in [n for n, _ in select_parameters(model)]

    with pytest.raises(ValueError, match=r"include pattern 'transformer\.wt\.weight' matches no parameter"):
        select_parameters(model, include=["transformer.wt.weight"])
    with pytest.raises(ValueError, match="unknown parameter kind"):
        select_parameters(model, kinds=["matrices"])


def test_unwrap_sees_through_wrappers() -> None:
    model = Mixed()
    wrapped = nn.DataParallel(model)  # on CPU a pass-through wrapper, with DDP's `.module` layout
    assert unwrap(wrapped) is model
    assert [n for n, _ in select_parameters(wrapped)] == ["conv.weight", "fc.weight", "head.weight"]


def test_make_optimizer_keeps_its_decay_rule() -> None:
    """optim.py now shares the kinds: decay stays on every >= 2-D tensor (matrices and embeddings)."""
    model = tiny_gpt()
    groups = make_optimizer(model, resolve_config("tiny").train).param_groups
    decay = {id(p) for p in groups[0]["params"]}
    assert decay == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.parameters() if p.dim() < 2}


def test_penalties_equal_their_formulas() -> None:
    model = Mixed()
    params = [p for _, p in select_parameters(model)]
    manual_l1 = sum(p.abs().sum() for p in params)
    manual_l2 = sum((p**2).sum() for p in params) / 2
    torch.testing.assert_close(l1_penalty(params), manual_l1)
    torch.testing.assert_close(l2_penalty(params), manual_l2)
    assert float(l1_penalty([])) == 0.0

    total, parts = Regularizer(RegularizationConfig(l1=0.01, l2=0.1)).penalty(model)
    torch.testing.assert_close(parts["l1"], 0.01 * manual_l1.detach())
    torch.testing.assert_close(parts["l2"], 0.1 * manual_l2.detach())
    torch.testing.assert_close(total, parts["l1"] + parts["l2"])
    assert total.requires_grad and not parts["l1"].requires_grad

    off = Regularizer(RegularizationConfig())
    assert not off.active and off.penalty(model)[1] == {} and float(off.penalty(model)[0]) == 0.0
    assert Regularizer(RegularizationConfig(l2=0.5)).penalty(model)[1].keys() == {"l2"}


def _train(optimizer_cls: type, reg: Regularizer | None, steps: int = 4, **opt: float) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    optimizer = optimizer_cls(model.parameters(), lr=0.05, **opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        if reg is not None:
            loss = loss + reg.penalty(model)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(a, b, strict=True))


def test_l2_penalty_is_torch_coupled_weight_decay_but_not_adamw() -> None:
    everything = ["matrix", "bias"]  # torch's weight_decay applies to every parameter
    reg = Regularizer(RegularizationConfig(l2=0.1, kinds=everything))
    # SGD: the penalty's gradient l2 * w is exactly SGD's weight_decay
    torch.testing.assert_close(_train(torch.optim.SGD, reg), _train(torch.optim.SGD, None, weight_decay=0.1))
    # Adam(weight_decay) adds l2 * w to the gradient before the adaptive scaling: the same as our penalty
    torch.testing.assert_close(_train(torch.optim.Adam, reg), _train(torch.optim.Adam, None, weight_decay=0.1))
    # AdamW decouples the decay from the gradient: a different update (what train.weight_decay does)
    explicit, decoupled = _train(torch.optim.Adam, reg), _train(torch.optim.AdamW, None, weight_decay=0.1)
    assert not _close(explicit, decoupled)
    assert max(float((a - b).abs().max()) for a, b in zip(explicit, decoupled, strict=True)) > 1e-3
    # and no regularisation at all differs from both
    assert not _close(explicit, _train(torch.optim.Adam, None))


def test_penalty_gradients_equal_autograd_of_the_penalty() -> None:
    reg = Regularizer(RegularizationConfig(l1=0.03, l2=0.2, kinds=["matrix", "embedding"]))
    a, b = Mixed(), Mixed()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.fc.weight[0, 0] = 0.0  # sign(0) = 0, as autograd's gradient of |w| at 0
        b.fc.weight[0, 0] = 0.0
    ids = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(0))
    a.train(False), b.train(False)
    (a(ids).sum() + reg.penalty(a)[0]).backward()
    b(ids).sum().backward()
    values = reg.add_penalty_gradients(b, with_values=True)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)
    assert values.keys() == {"l1", "l2"} and values["l2"] == pytest.approx(float(reg.penalty(a)[1]["l2"]))
    unused = nn.Linear(3, 3)  # a parameter without a gradient gets the penalty's alone
    reg.add_penalty_gradients(unused)
    torch.testing.assert_close(unused.weight.grad, 0.03 * unused.weight.sign() + 0.2 * unused.weight)


@pytest.mark.parametrize("dim", [0, 1])
def test_max_norm_equals_torch_renorm(dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(6, 5), (4, 3, 2, 2)]:
        w = torch.randn(*shape, generator=g)
        expected = torch.renorm(w, 2, dim, 1.5)
        torch.testing.assert_close(max_norm_(w.clone(), 1.5, dim), expected)
    with pytest.raises(ValueError, match="dim 2 does not exist"):
        max_norm_(torch.ones(3, 3), 1.0, 2)


def test_apply_max_norm_constrains_only_the_selected_weights() -> None:
    model = Mixed()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reg = Regularizer(RegularizationConfig(max_norm=0.5))
    assert reg.apply_max_norm(model) == 3
    assert float(model.fc.weight.detach().norm(dim=1).max()) <= 0.5 + 1e-6  # each output unit's incoming weights
    assert float(model.conv.weight.detach().flatten(1).norm(dim=1).max()) <= 0.5 + 1e-6
    for name in ("emb.weight", "fc.bias", "bn.weight", "temperature"):  # not selected: untouched
        torch.testing.assert_close(dict(model.named_parameters())[name], before[name])
    small = nn.Linear(4, 3)
    with torch.no_grad():
        small.weight.mul_(1e-3)
    kept = small.weight.detach().clone()
    Regularizer(RegularizationConfig(max_norm=0.5, max_norm_dim=1)).apply_max_norm(small)
    torch.testing.assert_close(small.weight, kept)  # rows already inside the ball are not changed
    assert Regularizer(RegularizationConfig(l2=1.0)).apply_max_norm(model) == 0  # off


def test_config_fields_validation_and_round_trip(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"l1=-1\.0 is invalid: expected a finite float >= 0"):
        RegularizationConfig(l1=-1.0)
    with pytest.raises(ValueError, match=r"max_norm_dim=2 is invalid: expected 0 \(rows\) or 1 \(columns\)"):
        RegularizationConfig(max_norm_dim=2)
    with pytest.raises(ValueError, match=r"kinds=\['matrices'\] is invalid"):
        RegularizationConfig(kinds=["matrices"])
    with pytest.raises(ConfigError, match=r"train\.l2=-0\.5 is invalid"):
        resolve_config("tiny", None, ["train.l2=-0.5"])
    with pytest.raises(ConfigError, match=r"train\.regularize=\['weights'\] is invalid"):
        resolve_config("tiny", None, ["train.regularize=weights"])
    with pytest.raises(ConfigError, match=r"train\.regularize_include.*wrong type"):
        resolve_config("tiny", None, ["train.regularize_include=3"])

    cfg = resolve_config(
        "tiny",
        None,
        [
            "train.l2=1e-4",
            "train.max_norm=3",
            "train.regularize=matrix,embedding",
            'train.regularize_exclude=["*.wpe.*"]',
        ],
    )
    assert cfg.train.regularize == ["matrix", "embedding"] and cfg.train.max_norm == 3.0
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_toml(path) == cfg
    reg = Regularizer.from_train_config(cfg.train)
    assert reg.config == RegularizationConfig(l2=1e-4, max_norm=3.0, kinds=["matrix", "embedding"], exclude=["*.wpe.*"])
    names = [n for n, _ in reg.parameters(tiny_gpt())]
    assert "transformer.wte.weight" in names and "transformer.wpe.weight" not in names
    assert "l2=0.0001, max_norm=3 on 9 tensors" in reg.describe(tiny_gpt())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dtensor_parameters_of_fully_sharded_modules() -> None:
    """FSDP2 keeps the module and makes parameters DTensors: penalties, gradients and max-norm still work.

    One process here (cheap); the same comparison with 2 gloo ranks, rows really split between them, was
    run by hand and agrees too, but costs ~20 s, too slow for the suite."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        sharded = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        plain.load_state_dict(sharded.state_dict())
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(sharded[0], mesh=mesh)
        fully_shard(sharded[2], mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        assert type(sharded[0].weight).__name__ == "DTensor"
        for dim in (0, 1):
            reg = Regularizer(RegularizationConfig(l1=0.01, l2=0.1, max_norm=0.3, max_norm_dim=dim))
            x = torch.randn(5, 8)
            sharded(x).sum().backward()
            plain(x).sum().backward()
            values = reg.add_penalty_gradients(sharded, with_values=True)
            assert values == pytest.approx(reg.add_penalty_gradients(plain, with_values=True))
            assert reg.add_penalty_gradients(nn.Linear(2, 2)) == {}  # values only when asked
            torch.testing.assert_close(sharded[0].weight.grad.full_tensor(), plain[0].weight.grad)
            reg.apply_max_norm(sharded)
            reg.apply_max_norm(plain)
            torch.testing.assert_close(sharded[2].weight.full_tensor(), plain[2].weight)
            sharded.zero_grad()
            plain.zero_grad()
    finally:
        dist.destroy_process_group()
