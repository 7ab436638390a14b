"""hardware.py: weights on huge pages (they move into one huge-page region and the model computes as before), and
bf16 linear layers computed through float32 where bf16 is emulated."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from bigmodel import hardware
from bigmodel.compress.quantize import quantize_int8
from bigmodel.config import GPTConfig
from bigmodel.generation import cast_for_inference
from bigmodel.models.gpt import GPT
from conftest import tiny_gpt

needs_huge_pages = pytest.mark.skipif(
    not hardware.huge_pages_available(), reason="no transparent huge pages (not Linux, or THP set to never)"
)


def _smaps_fields(t: torch.Tensor) -> dict[str, int]:
    """The numeric fields of /proc/self/smaps for the memory mapping that holds `t` (AnonHugePages in kB,
    THPeligible 0 or 1, ...)."""
    fields: dict[str, int] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):  # a mapping's header: "start-end perms ..."
            if inside:
                break
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            inside = lo <= t.data_ptr() < hi
        elif inside and len(parts) > 1 and parts[0].endswith(":") and parts[1].isdigit():
            fields[parts[0][:-1]] = int(parts[1])
    return fields


def _thp_fallbacks() -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("thp_fault_fallback "):
            return int(line.split()[1])
    return 0


@needs_huge_pages
def test_weights_move_keep_their_values_identity_and_ties() -> None:
    model = tiny_gpt(512, block_size=64, n_embd=64)
    before = {name: (p, p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, max_new_tokens=10)

    moved = hardware.weights_on_huge_pages(model, min_bytes=4096)

    big = [p for p, *_ in before.values() if p.nbytes >= 4096]
    assert moved == sum(p.nbytes for p in big) > 0
    for name, p in model.named_parameters():
        obj, address, value = before[name]
        assert p is obj  # the same Parameter: optimisers and ties see the new memory
        assert torch.equal(p, value) and p.dtype == value.dtype
        assert (p.data_ptr() != address) == (p.nbytes >= 4096), name
    assert model.lm_head.weight is model.transformer.wte.weight
    starts = sorted(p.data_ptr() for p in big)
    assert starts[0] % hardware.HUGE_PAGE == 0 and all(a % 64 == 0 for a in starts)
    assert torch.equal(model.generate(ids, max_new_tokens=10), expected)


@needs_huge_pages
def test_the_region_is_backed_by_huge_pages() -> None:
    """At least one 2 MB page, unless the kernel reported that it had none free (a fallback)."""
    model = GPT(GPTConfig(vocab_size=8192, block_size=64, n_layer=1, n_head=2, n_embd=256))  # 8 MB of wte
    fallbacks = _thp_fallbacks()
    assert hardware.weights_on_huge_pages(model) > 0
    fields = _smaps_fields(model.transformer.wte.weight)
    backed = fields.get("AnonHugePages", 0) * 1024
    if backed == 0 and _thp_fallbacks() > fallbacks:
        pytest.skip("the kernel had no free huge pages (thp_fault_fallback rose)")
    if backed == 0 and fields.get("THPeligible") == 0:
        pytest.skip("huge pages are disabled for this process (prctl PR_SET_THP_DISABLE or a container)")
    assert backed >= hardware.HUGE_PAGE


@needs_huge_pages
def test_moved_int8_model_saves_copies_and_decodes_the_same(tmp_path: Path) -> None:
    model = quantize_int8(tiny_gpt(512, block_size=64, n_embd=64))
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = model.generate(ids, max_new_tokens=12)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert hardware.weights_on_huge_pages(model, min_bytes=4096) > 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model.generate(ids, max_new_tokens=12), expected)  # through the compiled step
    assert torch.equal(copy.deepcopy(model).generate(ids, max_new_tokens=12), expected)

    fp32 = tiny_gpt(512, block_size=64, n_embd=64)
    hardware.weights_on_huge_pages(fp32, min_bytes=4096)
    fp32.save_pretrained(tmp_path)  # safetensors: each tensor has its own storage inside the region
    loaded = GPT.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(fp32.state_dict().values(), loaded.state_dict().values(), strict=True))


@needs_huge_pages
def test_tensors_sharing_storage_strided_and_small_ones_stay() -> None:
    holder = torch.nn.Module()
    whole = torch.randn(64, 1024)
    holder.register_buffer("first", whole[:32])
    holder.register_buffer("second", whole[32:])  # a view of the same storage
    holder.register_buffer("columns", torch.randn(1024, 64).t())  # not contiguous
    holder.register_buffer("small", torch.randn(4))
    holder.lin = torch.nn.Linear(256, 256)
    addresses = {name: t.data_ptr() for name, t in holder.named_buffers()}
    moved = hardware.weights_on_huge_pages(holder, min_bytes=4096)
    assert moved == holder.lin.weight.nbytes
    assert {name: t.data_ptr() for name, t in holder.named_buffers()} == addresses


@needs_huge_pages
def test_shared_buffers_dtypes_and_gradients_survive_and_a_second_call_moves_nothing() -> None:
    a, b = torch.nn.Module(), torch.nn.Module()
    shared = torch.randn(128, 128).to(torch.bfloat16)
    a.register_buffer("table", shared)
    b.register_buffer("table", shared)  # one buffer object held by two modules
    a.register_buffer("flags", torch.rand(1 << 16) > 0.5)
    a.weight = torch.nn.Parameter(torch.randn(256, 256))
    b.frozen = torch.nn.Parameter(torch.randn(256, 256), requires_grad=False)
    root = torch.nn.Sequential(a, b)
    values = {name: t.clone() for name, t in root.state_dict().items()}

    assert hardware.weights_on_huge_pages(root, min_bytes=4096) > 0
    assert a.table is b.table and a.table.data_ptr() != shared.data_ptr()  # replaced in both modules
    assert all(torch.equal(values[k], v) and values[k].dtype == v.dtype for k, v in root.state_dict().items())
    assert a.weight.requires_grad and not b.frozen.requires_grad
    a.weight.sum().backward()
    assert a.weight.grad is not None

    addresses = {name: t.data_ptr() for name, t in root.state_dict().items()}
    assert hardware.weights_on_huge_pages(root, min_bytes=4096) == 0  # already in a region
    assert {name: t.data_ptr() for name, t in root.state_dict().items()} == addresses


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("BIGMODEL_HUGE_PAGES", value)
    model = tiny_gpt(512, block_size=64, n_embd=64)
    address = model.transformer.wte.weight.data_ptr()
    assert not hardware.huge_pages_available()
    assert hardware.weights_on_huge_pages(model) == 0
    assert cast_for_inference(model, "fp32").transformer.wte.weight.data_ptr() == address


@needs_huge_pages
def test_cast_for_inference_moves_cpu_weights() -> None:
    model = cast_for_inference(GPT(GPTConfig(vocab_size=2048, block_size=64, n_layer=2, n_head=2, n_embd=128)), "int8")
    start = model.transformer.wte.weight.data_ptr()  # the first large tensor met: the region's start
    assert start % hardware.HUGE_PAGE == 0
    end = start + sum(t.nbytes + 64 for t in [*model.parameters(), *model.buffers()])
    int8 = [m.weight_int8 for m in model.modules() if hasattr(m, "weight_int8") and m.weight_int8.nbytes >= 1 << 16]
    assert int8 and all(start < t.data_ptr() < end for t in int8)


@pytest.mark.parametrize(
    "value, off", [("0", True), ("No", True), ("FALSE", True), ("1", False), ("yes", False), ("", False)]
)
def test_switched_off_reads_the_usual_spellings(monkeypatch: pytest.MonkeyPatch, value: str, off: bool) -> None:
    monkeypatch.setenv("BIGMODEL_SOME_SWITCH", value)
    assert hardware.switched_off("BIGMODEL_SOME_SWITCH") is off
    monkeypatch.delenv("BIGMODEL_SOME_SWITCH")
    assert not hardware.switched_off("BIGMODEL_SOME_SWITCH")  # unset: on


def test_bf16_linears_of_sixteen_rows_or_more_compute_through_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without native bf16 (as on the development machine: forced here), linear layers of a bf16 model
    with 16 or more rows take float32 products rounded to bf16, the weights widened a chunk of rows at a
    time: equal to torch's own bf16 product to bf16 rounding; fewer rows, other dtypes and other
    operations are left to torch as they are."""
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(hardware._Bf16LinearsInFloat, "CHUNK", 96 * 16)  # 16 weight rows at a time: 3 chunks
    lin = torch.nn.Linear(96, 40).to(torch.bfloat16)
    x = torch.randn(3, 6, 96, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # 18 rows
    few = x.flatten(0, 1)[:15]
    with hardware.bf16_linears_in_float(lin):
        many_out, few_out = lin(x), lin(few)
        fp32_out = torch.nn.functional.linear(x.float(), lin.weight.float())  # not bf16: untouched
        product = x @ lin.weight.T  # not F.linear: untouched
    assert many_out.dtype == few_out.dtype == torch.bfloat16 and fp32_out.dtype == torch.float32
    via_float = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float()).to(torch.bfloat16)
    assert torch.equal(many_out, via_float)
    torch.testing.assert_close(many_out, lin(x))  # bf16's tolerance: the two differ in summation order only
    assert torch.equal(few_out, lin(few))
    assert torch.equal(product, x @ lin.weight.T)
    with hardware.bf16_linears_in_float(lin):  # gradients flow as through the bf16 product
        lin(x.requires_grad_()).float().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.bfloat16


def test_bf16_linears_stay_native_where_they_are_native_or_not_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    bf16 = torch.nn.Linear(8, 8).to(torch.bfloat16)
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    assert isinstance(hardware.bf16_linears_in_float(bf16), torch.overrides.TorchFunctionMode)
    assert not isinstance(hardware.bf16_linears_in_float(torch.nn.Linear(8, 8)), torch.overrides.TorchFunctionMode)
    assert not isinstance(hardware.bf16_linears_in_float(torch.nn.Module()), torch.overrides.TorchFunctionMode)
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)  # AVX512-BF16 / AMX: torch's own kernels
    assert not isinstance(hardware.bf16_linears_in_float(bf16), torch.overrides.TorchFunctionMode)
