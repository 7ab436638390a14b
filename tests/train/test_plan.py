"""`bigmodel plan`: the parameter count is the model's, the per-rank split follows DDP/FSDP, and activation
checkpointing computes the same gradients with fewer saved activations."""

from __future__ import annotations

import pytest
import torch

from bigmodel.cli import main
from bigmodel.config import GPTConfig
from bigmodel.errors import UserError
from bigmodel.models.gpt import GPT
from bigmodel.train.plan import gpt_param_counts, parse_bytes, plan_memory


@pytest.mark.parametrize("bias", [True, False])
def test_param_count_matches_the_model(bias: bool) -> None:
    config = GPTConfig(vocab_size=1000, block_size=64, n_layer=3, n_head=4, n_embd=64, bias=bias)
    total, per_block, root = gpt_param_counts(config)
    model = GPT(config)
    assert total == model.num_params(non_embedding=False)
    assert per_block == sum(p.numel() for p in model.transformer.h[0].parameters())


def test_ddp_and_fsdp_split() -> None:
    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    ddp = plan_memory(config, micro_batch=8, world_size=4, strategy="ddp")
    fsdp = plan_memory(config, micro_batch=8, world_size=4, strategy="fsdp")
    assert ddp.params == fsdp.params == 124_439_808  # GPT-2 small, tied head counted once
    assert ddp.weights == 4 * ddp.params and ddp.optimizer == 8 * ddp.params
    assert fsdp.weights == ddp.weights / 4 and fsdp.gradients == ddp.gradients / 4 and fsdp.working > 0
    assert ddp.activations == fsdp.activations > ddp.activations_ckpt
    bf16 = plan_memory(config, micro_batch=8, world_size=4, strategy="ddp", bf16=True)
    assert bf16.activations < ddp.activations and bf16.weights == ddp.weights  # fp32 master weights
    with pytest.raises(UserError, match="expected ddp or fsdp"):
        plan_memory(config, 8, 2, "zero3")


def test_parse_bytes() -> None:
    assert parse_bytes("80GiB") == 80 * 1024**3 == parse_bytes("80 GB") == parse_bytes("80g")
    assert parse_bytes("512MiB") == 512 * 1024**2
    with pytest.raises(UserError, match="expected a size such as 80GiB"):
        parse_bytes("lots")


def test_plan_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--preset", "gpt2", "--world-size", "8", "--memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "124.4M parameters" in out and "world size 8" in out
    for row in ("weights", "gradients", "optimizer state", "activations, with checkpointing", "total"):
        assert row in out
    assert main(["plan", "--preset", "gpt2", "--world-size", "1", "--memory", "1GiB"]) == 0
    assert "no" in capsys.readouterr().out.split("fits in")[1]
    assert main(["plan", "--preset", "gpt2", "--memory", "huge"]) == 2
    assert "expected a size" in capsys.readouterr().err


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=3, n_head=2, n_embd=32)).train()
    x = torch.randint(0, 97, (4, 16))
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)
