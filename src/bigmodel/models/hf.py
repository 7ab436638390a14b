"""Hugging Face model-directory layout for GPT: config.json + model.safetensors + generation_config.json.

The files are what `transformers.GPT2LMHeadModel.save_pretrained` writes, so transformers loads our
directories and we load theirs. GPT-2 stores its projections as Conv1D, i.e. Linear weights transposed;
a model trained without biases is exported with zero biases (GPT-2 always has them), which computes the
same function.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from bigmodel import atomic
from bigmodel.config import GenerationConfig, GPTConfig, not_applied, settings_of
from bigmodel.errors import UserError
from bigmodel.models.gpt import GPT

if TYPE_CHECKING:
    from bigmodel.data.tokenizer import Tokenizer

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
UNSAFE_WEIGHTS = ("pytorch_model.bin", "model.pt", "model.bin", "pytorch_model.pt")


def hf_config(config: GPTConfig, eot_id: int | None) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
        "bigmodel_bias": config.bias,  # extra field: False means the zero biases below can be dropped on load
    }


def gpt_config_from_hf(cfg: dict[str, Any], where: Path) -> GPTConfig:
    if cfg.get("model_type") != "gpt2":
        raise UserError(f"{where}: model_type is {cfg.get('model_type')!r}; bigmodel's GPT loads 'gpt2' models")
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{where}: activation_function {act!r} is not supported (GPT-2 uses 'gelu_new')")
    if cfg.get("tie_word_embeddings", True) is False:
        raise UserError(
            f"{where}: tie_word_embeddings=false (a separate output head) is not supported; GPT-2 ties them"
        )
    if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]):
        raise UserError(f"{where}: n_inner={cfg['n_inner']} is not supported (only 4 * n_embd)")
    if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
        raise UserError(f"{where}: non-standard attention scaling is not supported")
    if abs(cfg.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise UserError(f"{where}: layer_norm_epsilon={cfg['layer_norm_epsilon']} is not supported (only 1e-5)")
    return GPTConfig(
        vocab_size=cfg["vocab_size"],
        block_size=cfg.get("n_positions", cfg.get("n_ctx", 1024)),
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        n_embd=cfg["n_embd"],
        dropout=cfg.get("resid_pdrop", 0.0),
        bias=cfg.get("bigmodel_bias", True),
    )


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    sd = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        sd[name] = tensor.t() if name.endswith(CONV1D) else tensor
    if not model.config.bias:  # GPT-2 always has biases: zeros make the same function
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                sd[f"{name}.bias"] = torch.zeros(module.out_features)
            elif name.endswith(("ln_1", "ln_2", "ln_f")):
                sd[f"{name}.bias"] = torch.zeros(model.config.n_embd)
    return {k: v.float().contiguous() for k, v in sd.items()}


def save_gpt(model: GPT, path: str | Path, tokenizer: Tokenizer | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    eot = tokenizer.eot_id if tokenizer is not None else None
    atomic.write_safetensors(path / "model.safetensors", to_hf_state_dict(model), metadata={"format": "pt"})
    atomic.write_json(path / "config.json", hf_config(model.config, eot))
    atomic.write_json(path / "generation_config.json", generation_config_to_hf(model.generation_config, eot))
    if tokenizer is not None:
        tokenizer.save_pretrained(path, model_max_length=model.config.block_size)


def generation_config_to_hf(config: Any, eot_id: int | None) -> dict[str, Any]:
    """generation_config.json: the end-of-text id as bos and eos (as GPT-2's own file has them), and what
    `config` (ours, transformers' own or a dict) sets, so transformers' generate starts where ours does;
    not a seed, which transformers would keep and not apply."""
    sets = settings_of(config, "model.generation_config")
    sets.pop("seed", None)
    if not sets.get("do_sample"):  # transformers refuses a greedy config with several sequences
        sets.pop("num_return_sequences", None)
    return {"bos_token_id": eot_id, "eos_token_id": eot_id, **sets}


def generation_config_from_hf(path: Path, cfg: dict[str, Any]) -> GenerationConfig:
    """The generation settings a directory sets, read as transformers reads them: generation_config.json,
    else config.json's eos and pad ids. Settings bigmodel's generate does not apply (a seed among them:
    transformers keeps one there and ignores it) are named in a warning."""
    file = path / "generation_config.json"
    if not file.is_file():
        return GenerationConfig(**{k: cfg[k] for k in ("eos_token_id", "pad_token_id") if cfg.get(k) is not None})
    raw = atomic.read_json_object(file)
    ignored = sorted(not_applied(raw) + (["seed"] if raw.get("seed") is not None else []))
    if ignored:
        warnings.warn(f"{file}: {', '.join(ignored)} not applied by bigmodel's generate", stacklevel=3)
    config = GenerationConfig(**settings_of({k: v for k, v in raw.items() if k not in ignored}, str(file)))
    try:  # values a call cannot run with: named now, refused by the calls that keep them (as transformers)
        config.resolved()
    except ValueError as e:
        warnings.warn(f"{file}: {e}; calls must set it themselves", stacklevel=3)
    return config


def read_weights(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a model directory: model.safetensors, sharded safetensors with an index, or (only with
    allow_pickle) pytorch_model.bin read by torch.load(weights_only=True)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index} is not a safetensors index (no weight_map): {e}") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise UserError(f"{index} names shard {f.name}, which is missing")
    else:
        unsafe = [path / n for n in UNSAFE_WEIGHTS if (path / n).is_file()]
        if unsafe and allow_pickle:
            try:
                state = torch.load(unsafe[0], map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
                raise UserError(
                    f"{unsafe[0]} could not be read with torch.load(weights_only=True), which refuses anything "
                    f"but tensors: {str(e).splitlines()[0]}"
                ) from e
            return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        hint = (
            f" It has {unsafe[0].name}, a pickle file that bigmodel does not load by default: convert it with "
            f"`bigmodel import {path} --out DIR --allow-pickle` (read with torch.load(weights_only=True)), or "
            "with transformers' save_pretrained(dir, safe_serialization=True)."
            if unsafe
            else ""
        )
        raise UserError(f"{path} has no model.safetensors.{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return tensors


class _ShapesOnly(torch.overrides.TorchFunctionMode):
    """Inside `with torch.device("meta"), _ShapesOnly():` modules get parameters of the right shapes and no
    values: their initialisation (normal_, uniform_, zero_, fill_) is skipped, where on the meta device it
    would do nothing anyway, but its first random fill imports torch._dynamo (~2 s). Thread-local, like
    every torch function mode."""

    SKIPPED = frozenset({"normal_", "uniform_", "zero_", "fill_"})

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init's functions take `tensor=`
        if getattr(func, "__name__", "") in self.SKIPPED and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


_DTYPES = {  # the dtypes weights load in, by transformers' names and bigmodel's (--dtype)
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def _named_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype of a name or dtype in _DTYPES; a ValueError for others."""
    named = _DTYPES.get(dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if named is None or named not in _DTYPES.values():
        raise ValueError(f"dtype={dtype!r}: use float32, bfloat16 or float16 (or fp32, bf16, fp16), or 'auto'")
    return named


def _stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """For "auto": the token embedding's stored dtype when it is float32, bf16 or fp16, else float32."""
    stored = next((t.dtype for k, t in tensors.items() if k.endswith("wte.weight")), torch.float32)
    return stored if stored in _DTYPES.values() else torch.float32


def load_gpt(path: str | Path, allow_pickle: bool = False, dtype: torch.dtype | str | None = None) -> GPT:
    """Build a GPT from a Hugging Face GPT-2 directory (ours, or one transformers saved), its weights in
    `dtype` (see GPT.from_pretrained)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"model directory {path} does not exist; pass a directory written by `bigmodel train` "
            "(RUN/final) or by transformers' save_pretrained"
        )
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json; it is not a model directory")
    cfg = atomic.read_json_object(path / "config.json")
    config = gpt_config_from_hf(cfg, path / "config.json")
    auto = dtype == "auto"
    want = torch.float32 if dtype is None or auto else _named_dtype(dtype)  # (checked before reading weights)
    tensors = read_weights(path, allow_pickle)
    if auto:
        want = _stored_dtype(tensors)
    with torch.device("meta"), _ShapesOnly():  # no random initialisation of weights about to be replaced
        model = GPT(config)
    own = model.state_dict()
    sd: dict[str, torch.Tensor] = {}
    for key in list(tensors):
        tensor = tensors.pop(key)  # (each stored tensor is let go once converted)
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old GPT-2 checkpoints store the causal mask as a buffer
        if name.endswith(CONV1D):
            tensor = tensor.t()  # made contiguous below: the compiled decoding kernels stream contiguous rows
        if name not in own:
            if name.endswith(".bias") and not config.bias:
                continue
            raise UserError(f"{path}: unexpected tensor {key!r}; this is not a GPT-2 layout")
        if tensor.dtype != want or not tensor.is_contiguous():  # one copy, converted and contiguous
            tensor = torch.empty(tensor.shape, dtype=want).copy_(tensor)
        sd[name] = tensor
    sd.setdefault("lm_head.weight", sd.get("transformer.wte.weight", torch.empty(0)))
    missing = sorted(set(own) - set(sd))
    if missing:
        raise UserError(f"{path} lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    for name, tensor in sd.items():
        if tensor.shape != own[name].shape:
            raise UserError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(own[name].shape)}"
            )
    model.load_state_dict(sd, assign=True)  # the loaded tensors become the parameters (no second copy)
    model.tie_weights()  # assign=True replaced both tensors; the embedding wins, as in transformers
    model.generation_config = generation_config_from_hf(path, cfg)
    return model.eval()
