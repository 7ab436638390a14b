"""Int8 quantization of Linear weights for inference (`--dtype int8`).

Every Linear weight W (out, in) is stored as int8 with one scale per output row (symmetric,
scale = max|W_row| / 127): a quarter of the fp32 bytes, and bytes read per token are what bound decoding
speed at small batch sizes. The kernel that computes y = x @ W.T + b is chosen once per layer
(`int8_kernel`; the environment variable BIGMODEL_INT8_KERNEL forces one):

- `numba` (CPU, when numba is installed; the default there). Up to 32 rows (decoding steps, short
  prompts) run `compress/int8_kernels.py`, which streams the int8 weights and rounds each activation row
  to int16 on its own scale (error at most 1/65534 of the row's largest value) to sum the products in
  integers; more rows (long prompts, evaluation) dequantize 256 weight rows at a time into one reused
  buffer and use the float32 BLAS on the activations as they are (a whole fp32 copy of the weight per
  call cost 3-4x more, mostly in page faults).
- `fbgemm` (x86 CPUs without numba): fbgemm's int8 GEMM, with each token's activations quantized on the
  fly on its own scale (dynamic quantization, 7-bit range to avoid AVX2 saturation), so tokens and batch
  rows never influence each other.
- `int8pack` (elsewhere, e.g. GPUs): `torch._weight_int8pack_mm`, weight-only.

Quality is measured, not assumed: `bigmodel eval MODEL --data DATA --dtype int8` against `--dtype fp32`.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.compress import int8_kernels
from bigmodel.models.gpt import GPT


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) float -> (int8 (out, in), scales (out,)) with W ~= int8 * scales[:, None]."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def fbgemm_available() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


KERNELS = ("numba", "fbgemm", "int8pack")


def int8pack_runs_on(device: torch.device) -> bool:
    """Whether this torch has a `torch._weight_int8pack_mm` kernel for the device type: on CPUs always, on
    GPUs only in recent versions."""
    key = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS", "xpu": "XPU"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm", key)


def int8_kernel(device: torch.device) -> str:
    """The int8 kernel for weights on `device`: BIGMODEL_INT8_KERNEL if set, else the fastest available.
    A ValueError where none runs there (a GPU with a torch whose int8pack has no kernel for it)."""
    forced = os.environ.get("BIGMODEL_INT8_KERNEL", "")
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"BIGMODEL_INT8_KERNEL={forced!r} is not one of {', '.join(KERNELS)}")
        if forced != "int8pack" and device.type != "cpu":
            raise ValueError(f"the {forced} int8 kernel runs on CPUs only, the weights are on {device}")
        if (forced == "numba" and not int8_kernels.available()) or (forced == "fbgemm" and not fbgemm_available()):
            raise ValueError(f"BIGMODEL_INT8_KERNEL={forced}: that kernel is not available in this installation")
        if forced != "int8pack":
            return forced
    elif device.type == "cpu" and int8_kernels.available():
        return "numba"
    elif device.type == "cpu" and fbgemm_available():
        return "fbgemm"
    if not int8pack_runs_on(device):
        raise ValueError(
            f"this torch ({torch.__version__}) has no {device.type} kernel for int8 weights "
            f"(torch._weight_int8pack_mm): quantize the model on the CPU, or use bf16 on {device}"
        )
    return "int8pack"


def _fbgemm_pack(q: torch.Tensor, scales: torch.Tensor) -> object | None:
    """fbgemm's packed int8 weight, or None where that engine (or torch's quantized tensors) is missing."""
    if not fbgemm_available():
        return None
    zeros = torch.zeros_like(scales, dtype=torch.long)
    with warnings.catch_warnings():  # torch deprecates quantized tensors; when they go, we use the fallback
        warnings.simplefilter("ignore", UserWarning)
        try:
            qw = torch._make_per_channel_quantized_tensor(q, scales.double(), zeros, 0)
            return torch.ops.quantized.linear_prepack(qw, None)
        except (RuntimeError, AttributeError):
            return None


def _per_row_dynamic(x: torch.Tensor, packed: object, staging: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fbgemm's dynamic int8 matmul with every row of x (M, in) quantized on its own grid, plus the bias.

    fbgemm picks one activation range for the whole input. Each row is scaled to max |x| = 1 and written
    into `staging` (M, in + 2), whose last two columns hold +1 and -1 (their weights are zero), so the
    range is [-1, 1] whatever the other rows hold: a row's result never depends on the rest of the batch
    or on later positions (the model stays causal). Pinning with columns rather than extra rows keeps a
    decoding step at M = 1, fbgemm's fast path, and it takes five ops: decoding is bound by per-op costs.
    """
    M, K = x.shape
    m = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True).clamp_(min=1e-12)  # (M, 1)
    torch.div(x, m, out=staging[:, :K])
    y = torch.ops.quantized.linear_dynamic(staging, packed, True)  # (M, out)
    return torch.addcmul(bias, y, m) if bias is not None else y.mul_(m)


def _dequantized_linear(
    x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, chunk: int = 256
) -> torch.Tensor:
    """x (M, K) @ (q (N, K) * scales[:, None]).T + bias through BLAS, dequantizing `chunk` rows of q at a
    time into one reused buffer; returns (M, N), computed as its transpose (each chunk's rows contiguous)."""
    N, K = q.shape
    out_t = x.new_empty(N, x.shape[0])  # (N, M)
    buf = x.new_empty(min(chunk, N), K)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        w = torch.mul(q[s:e], scales[s:e, None], out=buf[: e - s])  # (rows, K) float32
        if bias is None:
            torch.mm(w, x.t(), out=out_t[s:e])
        else:
            torch.addmm(bias[s:e, None], w, x.t(), out=out_t[s:e])
    return out_t.t()


def _int8pack_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scales[:, None]).T through `torch._weight_int8pack_mm`, in x's dtype.

    On CPUs with AVX512-BF16 (seen with torch 2.13 on an AMD Zen 5), its bf16 kernel returns garbage or
    crashes unless the inner size is a multiple of 16, so on every CPU such bf16 products run in float32
    and are rounded back."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and weight.size(1) % 16:
        return torch._weight_int8pack_mm(x.float(), weight, scales.float()).to(x.dtype)
    return torch._weight_int8pack_mm(x, weight, scales.to(x.dtype))


class Int8Linear(nn.Module):
    """A frozen Linear with int8 row-quantized weights, computed by the kernel `int8_kernel` picks.

    The fbgemm kernel reuses an input staging buffer between calls (fewer ops per decoding step), and
    numba's fallback `workqueue` threading layer does not allow concurrent parallel calls, so call a model
    from one thread at a time, as the generation engine (and the server's engine thread) do. Inputs on
    another device than the CPU kernels' run through `torch._weight_int8pack_mm`.
    """

    weight_int8: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out,) fp32
    _staging: dict[int, torch.Tensor]  # fbgemm: rows -> (rows, in + 2) input buffer, last 2 columns +1 and -1

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scales = quantize_rows(weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.kernel = int8_kernel(weight.device)
        self._zeros = torch.zeros(self.out_features)  # the numba kernels' bias when there is none
        self.packed = None
        if self.kernel == "fbgemm":
            pinned = torch.cat([q, q.new_zeros(self.out_features, 2)], dim=1)  # zero weights for the pin columns
            self.packed = _fbgemm_pack(pinned, scales)
            self.kernel = "fbgemm" if self.packed is not None else "int8pack"
        self._staging = {}

    def _staging_for(self, rows: int) -> torch.Tensor:
        """A reusable input buffer per row count (decoding calls with the same count every step)."""
        buf = self._staging.get(rows)
        if buf is None:
            if len(self._staging) > 8:  # prefill lengths vary: keep a handful, not one per length
                self._staging.clear()
            buf = torch.empty(rows, self.in_features + 2, device=self.scales.device)
            buf[:, -2], buf[:, -1] = 1.0, -1.0
            self._staging[rows] = buf
        return buf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        if self.kernel == "int8pack" or x2.device.type != "cpu":
            y = _int8pack_mm(x2, self.weight_int8, self.scales)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.view(*shape[:-1], self.out_features)
        xf = x2 if x2.dtype == torch.float32 else x2.float()
        bias = None if self.bias is None else self.bias.detach().float()  # fp32 even after a model.to(bf16)
        if self.kernel == "fbgemm":
            y = _per_row_dynamic(xf, self.packed, self._staging_for(xf.size(0)), bias)
        elif xf.requires_grad and torch.is_grad_enabled():  # a gradient for the input (the weights are frozen)
            y = F.linear(xf, self.dequantized(), bias)
        elif xf.size(0) <= int8_kernels.MAX_ROWS and int8_kernels.usable():  # decoding: stream the int8 weights
            y = int8_kernels.int8_matmul(xf, self.weight_int8, self.scales, bias if bias is not None else self._zeros)
        else:  # long prompts and evaluation: enough rows that BLAS on dequantized weights is faster
            y = _dequantized_linear(xf, self.weight_int8, self.scales.float(), bias)
        y = y if x.dtype == torch.float32 else y.to(x.dtype)  # (M, out)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer computes with, (out, in)."""
        return self.weight_int8.float() * self.scales.float()[:, None]


def quantize_int8(model: GPT) -> GPT:
    """Replace every Linear (the tied output head included) by Int8Linear, in place; returns the model.

    The token embedding stays fp32 (a lookup reads one row per token), so the tie is cut: the output head
    gets its own int8 copy. The result is for inference only.
    """
    model.float().eval()
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear(linear.weight, linear.bias))
    return model


def int8_error(weight: torch.Tensor) -> float:
    """Relative Frobenius error of the int8 approximation of `weight` (for reports and tests)."""
    q, s = quantize_rows(weight)
    return float(torch.linalg.norm(q.float() * s[:, None] - weight.float()) / torch.linalg.norm(weight.float()))
