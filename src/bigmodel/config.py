"""Run configuration: dataclasses, presets, TOML load/save and `--set a.b=value` overrides.

A run is described by one `RunConfig` = `model` (GPTConfig) + `train` (TrainConfig). It is resolved in
this order: preset -> TOML file -> `--set` overrides, then validated. Unknown keys are errors that list
the closest valid names. The resolved config is written as TOML into every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from numbers import Integral, Real
from pathlib import Path
from typing import Any, ClassVar

from bigmodel.errors import UserError


class ConfigError(UserError):
    """A config key or value is invalid; the message names the field and the allowed values."""


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: expected {allowed}")


class _Alias:
    """A field read under another name (transformers'), read-only: setting it names the field to set."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj, self.field)

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"{self.name} is read-only here: set {self.field}")


@dataclass(kw_only=True)
class GPTConfig:
    """GPT-2 architecture hyper-parameters (field names follow nanoGPT; HF names are mapped in models/hf.py)."""

    arch: ClassVar[str] = "gpt"
    default_task: ClassVar[str] = "lm"
    vocab_size: int | None = None  # None: taken from the data's tokenizer at train time
    block_size: int = 256  # context length in tokens
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2 has

    def __post_init__(self) -> None:
        if self.vocab_size is not None:
            _check(self.vocab_size >= 2, "model.vocab_size", self.vocab_size, "an integer >= 2")
        _check(self.block_size >= 1, "model.block_size", self.block_size, "an integer >= 1")
        _check(self.n_layer >= 1, "model.n_layer", self.n_layer, "an integer >= 1")
        _check(self.n_head >= 1, "model.n_head", self.n_head, "an integer >= 1")
        _check(self.n_embd >= 1, "model.n_embd", self.n_embd, "an integer >= 1")
        _check(
            self.n_embd % self.n_head == 0,
            "model.n_embd",
            self.n_embd,
            f"a multiple of model.n_head={self.n_head}",
        )
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a float in [0, 1)")

    # transformers' GPT2Config names, read-only: code written for it reads model.config.n_positions and such
    n_positions = _Alias("block_size")
    max_position_embeddings = _Alias("block_size")
    hidden_size = _Alias("n_embd")
    num_attention_heads = _Alias("n_head")
    num_hidden_layers = _Alias("n_layer")


# ----- model families other than GPT (models/<arch>.py); `model.arch` picks one --------------------------

CONNECTIONS = ("dense", "second-order", "interactive", "sparse")
ACTIVATIONS = ("relu", "gelu", "tanh")
MERGES = ("concat", "sum", "attention")


def _check_sizes(config: Any, *names: str) -> None:
    """Range checks shared by the families: sizes >= 1 (None = taken from the data), dropout in [0, 1)."""
    for name in names:
        value = getattr(config, name)
        if name == "dropout":
            _check(0.0 <= value < 1.0, f"model.{name}", value, "a float in [0, 1)")
        elif value is not None:
            _check(value >= 1, f"model.{name}", value, "an integer >= 1")


@dataclass(kw_only=True)
class MLPConfig:
    """Feature-vector classifier whose hidden layers use one connection pattern (see nn/connections.py).

    `connection`: dense (m x k), second-order (pairwise products; `rank` 0 = the full m*k*k form, r >= 1 = the
    factorized m*k*r form), interactive (`groups` blocks, `mix` = learned mixing between them) or sparse
    (a fixed random mask keeping `density` of the m*k connections).
    """

    arch: ClassVar[str] = "mlp"
    default_task: ClassVar[str] = "classify"
    in_features: int | None = None  # m: from the data
    n_classes: int | None = None  # from the data's labels
    hidden: int = 64  # k: width of each hidden layer
    n_hidden: int = 1  # hidden layers; 0 = a linear (softmax regression) classifier
    connection: str = "dense"
    rank: int = 0  # second-order: 0 = full form, r >= 1 = factorized form of rank r
    groups: int = 4  # interactive: number of input/output groups (must divide `hidden`)
    mix: bool = True  # interactive: learned g x g mixing between the groups
    density: float = 0.25  # sparse: fraction of connections kept, in (0, 1]
    activation: str = "relu"
    dropout: float = 0.0
    standardize: bool = True  # scale inputs by the training set's mean and std (stored in the model)

    def __post_init__(self) -> None:
        _check_sizes(self, "in_features", "hidden", "groups", "dropout")
        _check(self.n_hidden >= 0, "model.n_hidden", self.n_hidden, "an integer >= 0")
        _check(self.rank >= 0, "model.rank", self.rank, "an integer >= 0 (0 = full second-order form)")
        _check(self.connection in CONNECTIONS, "model.connection", self.connection, " | ".join(CONNECTIONS))
        _check(self.activation in ACTIVATIONS, "model.activation", self.activation, " | ".join(ACTIVATIONS))
        _check(0.0 < self.density <= 1.0, "model.density", self.density, "a float in (0, 1]")
        if self.connection == "interactive":
            allowed = f"a multiple of model.groups={self.groups}"
            _check(self.hidden % self.groups == 0, "model.hidden", self.hidden, allowed)
        if self.n_classes is not None:
            _check(self.n_classes >= 2, "model.n_classes", self.n_classes, "an integer >= 2")


@dataclass(kw_only=True)
class MultiInputConfig:
    """Several inputs of one kind, one shared feature extractor applied to each, merged features -> a head."""

    arch: ClassVar[str] = "multi-input"
    default_task: ClassVar[str] = "classify"
    n_inputs: int | None = None  # inputs per example: from a 3-D array (N, n_inputs, m), or splits 2-D columns
    in_features: int | None = None  # m: features per input (from the data)
    n_classes: int | None = None
    extractor_hidden: int = 32  # the extractor: m -> extractor_hidden -> features
    features: int = 16  # d: extracted features per input
    merge: str = "concat"  # concat (n * d) | sum (d) | attention (learned attention pooling, d)
    shared: bool = True  # one extractor for every input; false = one per input (n times the parameters)
    hidden: int = 32  # head hidden width; 0 = a linear head
    activation: str = "relu"
    dropout: float = 0.0
    standardize: bool = True

    def __post_init__(self) -> None:
        _check_sizes(self, "n_inputs", "in_features", "extractor_hidden", "features", "dropout")
        _check(self.hidden >= 0, "model.hidden", self.hidden, "an integer >= 0 (0 = linear head)")
        _check(self.merge in MERGES, "model.merge", self.merge, " | ".join(MERGES))
        _check(self.activation in ACTIVATIONS, "model.activation", self.activation, " | ".join(ACTIVATIONS))
        if self.n_classes is not None:
            _check(self.n_classes >= 2, "model.n_classes", self.n_classes, "an integer >= 2")


@dataclass(kw_only=True)
class Seq2SeqConfig:
    """Encoder-decoder Transformer (pre-norm, sinusoidal positions, self- and cross-attention) over bytes."""

    arch: ClassVar[str] = "seq2seq"
    default_task: ClassVar[str] = "seq2seq"
    vocab_size: int | None = None  # from the tokenizer (bytes + end/start/pad tokens)
    max_source_len: int = 96  # in bytes; longer sources are refused by the data loader, naming the pair
    max_target_len: int = 32
    n_encoder_layer: int = 2
    n_decoder_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    d_ff: int = 512  # feed-forward hidden width
    dropout: float = 0.1
    tie_embeddings: bool = True  # source and target embeddings and the output projection are one matrix
    num_beams: int = 1  # decoding for evaluation: 1 = greedy, > 1 = beam search

    def __post_init__(self) -> None:
        _check_sizes(self, "max_source_len", "max_target_len", "n_encoder_layer", "n_decoder_layer", "n_head")
        _check_sizes(self, "n_embd", "d_ff", "dropout", "num_beams")
        if self.vocab_size is not None:
            _check(self.vocab_size >= 4, "model.vocab_size", self.vocab_size, "an integer >= 4")
        _check(self.n_embd % self.n_head == 0, "model.n_embd", self.n_embd, f"a multiple of model.n_head={self.n_head}")


RNN_CELLS = ("gru", "lstm")
RNN_ATTENTIONS = ("bahdanau", "luong")


@dataclass(kw_only=True)
class RNNSeq2SeqConfig:
    """GRU/LSTM encoder-decoder with additive (Bahdanau) or multiplicative (Luong) attention, over bytes."""

    arch: ClassVar[str] = "rnn-seq2seq"
    default_task: ClassVar[str] = "seq2seq"
    vocab_size: int | None = None
    max_source_len: int = 96
    max_target_len: int = 32
    cell: str = "gru"
    attention: str = "bahdanau"
    n_embd: int = 64
    hidden: int = 128  # decoder state width; the bidirectional encoder has hidden / 2 per direction
    n_layer: int = 1
    dropout: float = 0.1
    tie_embeddings: bool = True
    num_beams: int = 1

    def __post_init__(self) -> None:
        _check_sizes(self, "max_source_len", "max_target_len", "n_embd", "hidden", "n_layer", "dropout", "num_beams")
        if self.vocab_size is not None:
            _check(self.vocab_size >= 4, "model.vocab_size", self.vocab_size, "an integer >= 4")
        _check(self.cell in RNN_CELLS, "model.cell", self.cell, " | ".join(RNN_CELLS))
        _check(self.attention in RNN_ATTENTIONS, "model.attention", self.attention, " | ".join(RNN_ATTENTIONS))
        _check(self.hidden % 2 == 0, "model.hidden", self.hidden, "an even integer (two encoder directions)")


@dataclass(kw_only=True)
class EncoderConfig:
    """BERT-style Transformer encoder: masked-language-model pretraining, or a classifier (n_classes set)."""

    arch: ClassVar[str] = "encoder"
    default_task: ClassVar[str] = "mlm"
    vocab_size: int | None = None  # from the tokenizer (+ the mask and pad tokens)
    block_size: int = 128  # longest input in tokens
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    d_ff: int = 512
    dropout: float = 0.1
    n_classes: int | None = None  # set by the classify task; None = the masked-LM head
    mask_prob: float = 0.15  # mlm: fraction of tokens to predict (80% [MASK], 10% random, 10% kept)
    init_from: str = ""  # classify: a model directory of a pretrained encoder whose trunk to start from
    tokenizer: str = ""  # classify from scratch: a data/model directory or tokenizer.json to tokenize with; "" = bytes

    def __post_init__(self) -> None:
        _check_sizes(self, "block_size", "n_layer", "n_head", "n_embd", "d_ff", "dropout")
        if self.vocab_size is not None:
            _check(self.vocab_size >= 4, "model.vocab_size", self.vocab_size, "an integer >= 4")
        _check(self.n_embd % self.n_head == 0, "model.n_embd", self.n_embd, f"a multiple of model.n_head={self.n_head}")
        _check(0.0 < self.mask_prob < 1.0, "model.mask_prob", self.mask_prob, "a float in (0, 1)")
        if self.n_classes is not None:
            _check(self.n_classes >= 2, "model.n_classes", self.n_classes, "an integer >= 2")


SPARSITY = ("l1", "kl", "none")


@dataclass(kw_only=True)
class AutoencoderConfig:
    """Sparse autoencoder: ReLU code with an L1 activity penalty, or sigmoid code with a KL sparsity target."""

    arch: ClassVar[str] = "autoencoder"
    default_task: ClassVar[str] = "autoencode"
    in_features: int | None = None
    hidden: int = 64  # code width (may exceed in_features: sparsity, not width, limits the code)
    sparsity: str = "l1"
    l1: float = 1e-3  # weight of mean |code| in the loss (sparsity = "l1")
    kl_target: float = 0.05  # target mean activation rho of each code unit (sparsity = "kl")
    kl_weight: float = 0.1  # weight of sum KL(rho || rho_hat) in the loss (sparsity = "kl")
    tied: bool = False  # decoder weight = encoder weight transposed (one tensor)
    standardize: bool = True

    def __post_init__(self) -> None:
        _check_sizes(self, "in_features", "hidden")
        _check(self.sparsity in SPARSITY, "model.sparsity", self.sparsity, " | ".join(SPARSITY))
        _check(self.l1 >= 0, "model.l1", self.l1, "a float >= 0")
        _check(0.0 < self.kl_target < 1.0, "model.kl_target", self.kl_target, "a float in (0, 1)")
        _check(self.kl_weight >= 0, "model.kl_weight", self.kl_weight, "a float >= 0")


ModelConfig = (
    GPTConfig | MLPConfig | MultiInputConfig | Seq2SeqConfig | RNNSeq2SeqConfig | EncoderConfig | AutoencoderConfig
)
# `model.arch` -> its config class. GPT is the default (language modelling); each task has a default arch.
MODEL_CONFIGS: dict[str, type[Any]] = {
    "gpt": GPTConfig,
    "mlp": MLPConfig,
    "multi-input": MultiInputConfig,
    "seq2seq": Seq2SeqConfig,
    "rnn-seq2seq": RNNSeq2SeqConfig,
    "encoder": EncoderConfig,
    "autoencoder": AutoencoderConfig,
}
# The archs each task trains; the first is the task's default.
TASK_ARCHS: dict[str, tuple[str, ...]] = {
    "lm": ("gpt",),
    "classify": ("mlp", "multi-input", "encoder"),
    "seq2seq": ("seq2seq", "rnn-seq2seq"),
    "mlm": ("encoder",),
    "autoencode": ("autoencoder",),
}


@dataclass(kw_only=True)
class GenerationConfig:
    """The knobs of generation, named as in transformers' GenerationConfig and, as there (transformers 5),
    None until set: a config sets what is not None (`set_fields`), and `resolved()` fills in transformers'
    defaults (see ResolvedGeneration: greedy; when sampling, temperature 1 and the top 50 tokens). `GPT.generate`
    starts from the model's own (`model.generation_config`, read from a directory's generation_config.json),
    lays a `generation_config=` over it, then the keywords."""

    max_new_tokens: int | None = None  # wins over max_length
    max_length: int | None = None  # prompt + new tokens
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None  # 0: off
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    num_return_sequences: int | None = None
    eos_token_id: int | list[int] | None = None  # stop token ids
    pad_token_id: int | None = None
    seed: int | None = None

    def set_fields(self) -> dict[str, Any]:
        """The settings this config sets (those not None)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def resolved(self) -> ResolvedGeneration:
        """This config with transformers' defaults for what it leaves unset; a ValueError for invalid values."""
        return ResolvedGeneration(**self.set_fields())

    @property
    def stop_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @property
    def pad_id(self) -> int:
        """The id that pads finished rows and shorter prompts: pad_token_id, else the first stop id, else 0."""
        return self.pad_token_id if self.pad_token_id is not None else (self.stop_ids or [0])[0]


GENERATION_FIELDS = frozenset(f.name for f in fields(GenerationConfig))


@dataclass(kw_only=True)
class ResolvedGeneration(GenerationConfig):
    """A GenerationConfig with transformers' defaults (these fields') in place of what was unset, its values
    checked when made (and so when `dataclasses.replace` makes one): what the engine runs."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # when sampling; 0: off
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) is None and f.default is not None:
                setattr(self, f.name, f.default)

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        if self.max_new_tokens is not None:
            self.max_length = None  # max_new_tokens wins: an unused max_length is not checked either
        for name, kind in _GENERATION_TYPES.items():  # (numpy's and torch's scalars too, as plain numbers)
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _plain(value, kind, f"{name}={value!r} must be {_KIND_NAMES[kind]}"))
        if self.eos_token_id is not None:
            ids: Any = self.eos_token_id
            if hasattr(ids, "tolist") and getattr(ids, "ndim", 0) == 1:  # a numpy array or tensor of ids
                ids = ids.tolist()
            message = f"eos_token_id={ids!r} must be a token id or a list of them"
            many = isinstance(ids, list | tuple)
            self.eos_token_id = [_plain(i, Integral, message) for i in ids] if many else _plain(ids, Integral, message)
        for token in self.stop_ids:
            check(-(2**63) <= token < 2**63, f"eos_token_id {token} is beyond int64")
        check(
            0 <= self.pad_id < 2**63,
            f"the pad id {self.pad_id} (pad_token_id, else the first eos id) must be in [0, 2**63): set pad_token_id",
        )

        check(
            self.max_new_tokens is None or self.max_new_tokens >= 1,
            f"max_new_tokens={self.max_new_tokens} must be >= 1",
        )
        check(self.max_length is None or self.max_length >= 1, f"max_length={self.max_length} must be >= 1")
        check(self.num_return_sequences >= 1, f"num_return_sequences={self.num_return_sequences} must be >= 1")
        check(self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty} must be > 0 (1.0 = off)")
        if self.do_sample:
            check(
                self.temperature > 0, f"temperature={self.temperature} must be > 0 when sampling (or do_sample=False)"
            )
            check(self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)")
            check(self.top_p is None or 0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]")
            check(self.min_p is None or 0 <= self.min_p <= 1, f"min_p={self.min_p} must be in [0, 1]")

    def resolved(self) -> ResolvedGeneration:
        return self


_GENERATION_TYPES: dict[str, type] = {
    "max_new_tokens": Integral,
    "max_length": Integral,
    "top_k": Integral,
    "num_return_sequences": Integral,
    "pad_token_id": Integral,
    "seed": Integral,
    "temperature": Real,
    "top_p": Real,
    "min_p": Real,
    "repetition_penalty": Real,
}


_KIND_NAMES: dict[type, str] = {Integral: "an integer", Real: "a number"}


def _plain(value: Any, kind: type, message: str) -> Any:
    """`value` as a Python int (kind Integral) or float (Real), numpy's and torch's scalars too; a ValueError
    with `message` for anything else (bools and strings among them)."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy scalar or 0-d tensor
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(message)
    try:
        return int(value) if kind is Integral else float(value)  # type: ignore[call-overload, arg-type]
    except OverflowError:  # an integer too large for a float
        raise ValueError(message) from None


# transformers' generation settings that change nothing bigmodel's generate does, or that hold its defaults
# (transformers' GenerationConfig._get_default_generation_params)
_GENERATION_INERT = {"bos_token_id", "transformers_version", "_from_model_config", "use_cache"}
_GENERATION_DEFAULTS = {
    "min_length": 0,
    "early_stopping": False,
    "num_beams": 1,
    "typical_p": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict_in_generate": False,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.4,
    "assistant_lookbehind": 10,
    "target_lookbehind": 10,
}
_NO_DEFAULT = object()
# what to use instead of transformers' settings bigmodel does not apply
_GENERATION_INSTEAD = {
    "num_beams": "beam search is not built (num_beams=1 is accepted): decode greedily or sample",
    "output_scores": "output_logprobs=True returns the chosen tokens' log-probabilities",
    "return_dict_in_generate": "generate returns the ids, and (ids, logprobs) with output_logprobs=True",
    "no_repeat_ngram_size": "not built: repetition_penalty > 1 discourages repeats",
    "stop_strings": "pass stop_strings= (with tokenizer=) to generate",
}


def not_applied(raw: dict[str, Any]) -> list[str]:
    """The transformers generation settings in `raw` that bigmodel's generate does not apply: keys it lacks
    whose values are neither None nor transformers' defaults."""
    return sorted(
        k
        for k, v in raw.items()
        if k not in GENERATION_FIELDS | _GENERATION_INERT
        and v is not None
        and v != _GENERATION_DEFAULTS.get(k, _NO_DEFAULT)
    )


def instead_hints(names: list[str]) -> str:
    """What to use instead of the settings named, for an error message ("" when there is nothing to say)."""
    return "".join(f"; {name}: {_GENERATION_INSTEAD[name]}" for name in names if name in _GENERATION_INSTEAD)


def settings_of(config: Any, name: str = "generation_config") -> dict[str, Any]:
    """What a generation config sets: bigmodel's (`set_fields`), transformers' own (what differs from its
    defaults, `to_diff_dict`, but a seed) or a dict (what is not None); a ValueError names settings
    bigmodel's generate would not apply."""
    if isinstance(config, GenerationConfig):
        return config.set_fields()
    if hasattr(config, "to_diff_dict"):  # transformers' own: it keeps a seed but does not apply it
        raw = {k: v for k, v in config.to_diff_dict().items() if k != "seed"}
    else:
        raw = dict(config)
    ignored = not_applied(raw)
    if ignored:
        hints = instead_hints(ignored)
        raise ValueError(f"{name} sets {', '.join(ignored)}: not applied by bigmodel's generate{hints}")
    return {k: v for k, v in raw.items() if k in GENERATION_FIELDS and v is not None}


def arch_of(model: Any) -> str:
    """The `model.arch` name of a model config instance."""
    return str(getattr(type(model), "arch", "gpt"))


PRECISIONS = ("auto", "bf16", "fp32")
PARALLEL = ("auto", "none", "ddp", "fsdp")
NONFINITE = ("skip", "stop", "rollback")

# Parameter kinds a regulariser can select (see nn/regularizers.py: `parameter_kind`).
PARAM_KINDS = ("matrix", "embedding", "norm", "bias", "other")
EARLY_STOPPING_MODES = ("auto", "min", "max")


def _check_regularization(
    prefix: str,
    l1: float,
    l2: float,
    max_norm: float,
    max_norm_dim: int,
    kinds: list[str],
    include: list[str],
    exclude: list[str],
    names: tuple[str, str, str] = ("kinds", "include", "exclude"),
) -> None:
    """One validation for RegularizationConfig and the matching TrainConfig fields (named with `prefix`)."""
    _check(l1 >= 0 and math.isfinite(l1), f"{prefix}l1", l1, "a finite float >= 0 (0 = off)")
    _check(l2 >= 0 and math.isfinite(l2), f"{prefix}l2", l2, "a finite float >= 0 (0 = off)")
    _check(max_norm >= 0 and math.isfinite(max_norm), f"{prefix}max_norm", max_norm, "a finite float >= 0 (0 = off)")
    _check(max_norm_dim in (0, 1), f"{prefix}max_norm_dim", max_norm_dim, "0 (rows) or 1 (columns)")
    bad = [k for k in kinds if k not in PARAM_KINDS]
    _check(not bad, f"{prefix}{names[0]}", kinds, f"a list of {', '.join(PARAM_KINDS)}")
    for name, patterns in zip(names[1:], (include, exclude), strict=True):
        ok = all(isinstance(x, str) and x for x in patterns)
        _check(ok, f"{prefix}{name}", patterns, "a list of parameter-name globs, e.g. ['transformer.wte.weight']")


@dataclass(kw_only=True)
class RegularizationConfig:
    """Explicit penalties and max-norm constraints (nn/regularizers.py); all off by default.

    The penalty `l1 * sum|w| + l2 / 2 * sum w^2` over the selected parameters is added to the loss (its
    gradient is `l2 * w`: an explicit L2 term, which Adam rescales; not AdamW's decoupled weight decay).
    `max_norm` > 0 rescales, after each optimizer step, every row (`max_norm_dim=0`, each output unit's
    incoming weights in an nn.Linear) or column (1) whose L2 norm exceeds it. Selection: parameters whose
    kind is in `kinds` (default matrices only: no embeddings, norms or biases), plus any whose name matches
    an `include` glob, minus any matching an `exclude` glob.
    """

    l1: float = 0.0
    l2: float = 0.0
    max_norm: float = 0.0
    max_norm_dim: int = 0
    kinds: list[str] = field(default_factory=lambda: ["matrix"])
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_regularization(
            "", self.l1, self.l2, self.max_norm, self.max_norm_dim, self.kinds, self.include, self.exclude
        )


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing of one training run."""

    max_steps: int = 2000  # optimizer steps
    max_minutes: float = 0.0  # wall-clock budget for training; 0 = none. The schedule then follows the clock.
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # decoupled (AdamW), on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    batch_tokens: int = 8192  # global batch: tokens per optimizer step
    micro_batch: int = 16  # sequences per forward/backward; gradient accumulation makes up the rest
    eval_every: int = 250  # steps between validation evaluations; 0 = only at the end
    eval_tokens: int = 65536  # validation tokens per periodic evaluation (the final one uses the whole split)
    checkpoint_every: int = 500  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # keep the newest K complete checkpoints
    log_every: int = 10  # steps between metrics.csv rows
    precision: str = "auto"  # auto: bf16 autocast where the hardware supports it, else fp32
    compile: bool = False  # torch.compile the model
    seed: int = 1337
    deterministic: bool = False  # torch deterministic algorithms: bit-equal losses after --resume
    # --- scale-out and guards (train/distributed.py, train/guards.py) ---
    parallel: str = "auto"  # under torchrun: ddp | fsdp (auto = ddp); one process is never wrapped
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    on_nonfinite: str = "skip"  # NaN/inf loss or gradient norm: skip the update | stop | rollback to a checkpoint
    max_nonfinite_in_row: int = 5  # this many non-finite steps in a row stop the run whatever the policy
    spike_factor: float = 3.0  # log a loss spike when the loss exceeds this x the running median; 0 = off
    # generalisation (docs/generalization.md); everything here is off by default
    label_smoothing: float = 0.0  # training loss only: this mass is spread over all classes/tokens; eval is unsmoothed
    l1: float = 0.0  # explicit L1 penalty l1 * sum|w| on the regularised parameters, added to the loss
    l2: float = 0.0  # explicit L2 penalty l2/2 * sum w^2 (unlike weight_decay, Adam rescales its gradient)
    max_norm: float = 0.0  # after each step, rescale rows (or columns) of the regularised weights to norm <= this
    max_norm_dim: int = 0  # 0: rows (each output unit's incoming weights), 1: columns
    regularize: list[str] = field(default_factory=lambda: ["matrix"])  # kinds: matrix embedding norm bias other
    regularize_include: list[str] = field(default_factory=list)  # extra parameters by name glob
    regularize_exclude: list[str] = field(default_factory=list)  # parameters to leave alone, by name glob
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement; 0 = off
    early_stopping_metric: str = "val_loss"
    early_stopping_mode: str = "auto"  # min | max | auto (min for losses and errors, max for accuracy-like)
    early_stopping_min_delta: float = 0.0  # an improvement must beat the best by more than this
    # --- tasks other than lm (classify, seq2seq, mlm, autoencode) count their batches in examples ---
    batch_size: int = 64  # global batch: examples per optimizer step (micro_batch examples per forward)
    bootstrap: bool = False  # bagging: train on a bootstrap resample of the training examples, drawn from `seed`

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, "train.max_steps", self.max_steps, "an integer >= 1")
        _check(self.max_minutes >= 0, "train.max_minutes", self.max_minutes, "minutes >= 0 (0 = no budget)")
        _check(self.lr > 0 and math.isfinite(self.lr), "train.lr", self.lr, "a finite float > 0")
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "a float in [0, 1]")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a float >= 0")
        _check(0 <= self.beta1 < 1, "train.beta1", self.beta1, "a float in [0, 1)")
        _check(0 <= self.beta2 < 1, "train.beta2", self.beta2, "a float in [0, 1)")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "a float >= 0 (0 = no clipping)")
        _check(self.batch_tokens >= 1, "train.batch_tokens", self.batch_tokens, "an integer >= 1")
        _check(self.micro_batch >= 1, "train.micro_batch", self.micro_batch, "an integer >= 1")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, "an integer >= 0")
        _check(self.eval_tokens >= 1, "train.eval_tokens", self.eval_tokens, "an integer >= 1")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every, "an integer >= 0")
        _check(self.keep_checkpoints >= 2, "train.keep_checkpoints", self.keep_checkpoints, "an integer >= 2")
        _check(self.log_every >= 1, "train.log_every", self.log_every, "an integer >= 1")
        _check(self.precision in PRECISIONS, "train.precision", self.precision, " | ".join(PRECISIONS))
        _check(self.parallel in PARALLEL, "train.parallel", self.parallel, " | ".join(PARALLEL))
        _check(self.on_nonfinite in NONFINITE, "train.on_nonfinite", self.on_nonfinite, " | ".join(NONFINITE))
        _check(self.max_nonfinite_in_row >= 1, "train.max_nonfinite_in_row", self.max_nonfinite_in_row, ">= 1")
        _check(self.spike_factor == 0 or self.spike_factor > 1, "train.spike_factor", self.spike_factor, "0 or > 1")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "a float in [0, 1)")
        _check_regularization(
            "train.",
            self.l1,
            self.l2,
            self.max_norm,
            self.max_norm_dim,
            self.regularize,
            self.regularize_include,
            self.regularize_exclude,
            names=("regularize", "regularize_include", "regularize_exclude"),
        )
        _check(
            self.early_stopping_patience >= 0,
            "train.early_stopping_patience",
            self.early_stopping_patience,
            "an integer >= 0 (0 = off)",
        )
        _check(
            bool(self.early_stopping_metric.strip()),
            "train.early_stopping_metric",
            self.early_stopping_metric,
            "a metric name such as val_loss",
        )
        _check(
            self.early_stopping_mode in EARLY_STOPPING_MODES,
            "train.early_stopping_mode",
            self.early_stopping_mode,
            " | ".join(EARLY_STOPPING_MODES),
        )
        _check(
            self.early_stopping_min_delta >= 0 and math.isfinite(self.early_stopping_min_delta),
            "train.early_stopping_min_delta",
            self.early_stopping_min_delta,
            "a finite float >= 0",
        )
        _check(
            not (self.early_stopping_patience and not self.eval_every),
            "train.early_stopping_patience",
            self.early_stopping_patience,
            "0 while train.eval_every=0 (early stopping needs periodic evaluations: set train.eval_every)",
        )
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")

    def regularization(self) -> RegularizationConfig:
        """The regularisation fields as the RegularizationConfig that nn.regularizers.Regularizer takes."""
        return RegularizationConfig(
            l1=self.l1,
            l2=self.l2,
            max_norm=self.max_norm,
            max_norm_dim=self.max_norm_dim,
            kinds=list(self.regularize),
            include=list(self.regularize_include),
            exclude=list(self.regularize_exclude),
        )


@dataclass(kw_only=True)
class RunConfig:
    """Everything that defines a training run; written as config.toml into the run and its checkpoints."""

    preset: str = "small"
    task: str = "lm"  # what the loop trains: a key of bigmodel.tasks.TASKS
    model: ModelConfig = field(default_factory=GPTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-steps per optimizer step so that one step sees `train.batch_tokens` tokens."""
        if not isinstance(self.model, GPTConfig):
            return self.example_accum_steps(world_size)
        per_micro = self.train.micro_batch * self.model.block_size * world_size
        if self.train.batch_tokens % per_micro:
            raise ConfigError(
                f"train.batch_tokens={self.train.batch_tokens} is not a multiple of train.micro_batch * "
                f"model.block_size * world_size = {per_micro}; set train.batch_tokens to a multiple of it "
                f"(e.g. {max(1, round(self.train.batch_tokens / per_micro)) * per_micro})"
            )
        return self.train.batch_tokens // per_micro

    def example_accum_steps(self, world_size: int = 1) -> int:
        """Micro-steps per optimizer step so that one step sees `train.batch_size` examples (tasks other than lm)."""
        per_micro = self.train.micro_batch * world_size
        if self.train.batch_size % per_micro:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} is not a multiple of train.micro_batch * world_size = "
                f"{per_micro}; set train.batch_size to a multiple of it "
                f"(e.g. {max(1, round(self.train.batch_size / per_micro)) * per_micro})"
            )
        return self.train.batch_size // per_micro


# Training defaults shared by the presets of the example-counted tasks (classify, seq2seq, mlm, autoencode).
_EXAMPLE_TRAIN: dict[str, Any] = dict(
    warmup_steps=20,
    batch_size=64,
    micro_batch=64,
    eval_every=100,
    eval_tokens=100_000,  # examples per periodic evaluation: the whole validation set of the built-in data
    checkpoint_every=0,
    log_every=10,
)

# Named model shapes. `tiny` is for tests, `small` is tuned for the 5-minute CPU demo, `gpt2` is GPT-2 124M.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "model": dict(block_size=64, n_layer=2, n_head=2, n_embd=64),
        "train": dict(
            max_steps=50,
            lr=3e-3,
            warmup_steps=5,
            batch_tokens=1024,
            micro_batch=8,
            eval_every=25,
            eval_tokens=4096,
            checkpoint_every=25,
            log_every=1,
        ),
    },
    "small": {  # tuned for `bigmodel demo`: the best held-out score after 5 minutes on 2 fp32 CPU cores
        "model": dict(block_size=128, n_layer=4, n_head=4, n_embd=256, dropout=0.0),
        "train": dict(
            max_steps=5000,
            lr=2e-3,
            warmup_steps=30,
            batch_tokens=2048,
            micro_batch=16,
            eval_every=100,
            eval_tokens=16384,
            checkpoint_every=250,
            log_every=10,
        ),
    },
    "gpt2": {
        "model": dict(block_size=1024, n_layer=12, n_head=12, n_embd=768),
        "train": dict(lr=6e-4, warmup_steps=700, batch_tokens=524288, micro_batch=8),
    },
    "gpt2-medium": {
        "model": dict(block_size=1024, n_layer=24, n_head=16, n_embd=1024),
        "train": dict(lr=3e-4, warmup_steps=700, batch_tokens=524288, micro_batch=4),
    },
    # The other model families (docs/zoo.md): each arch's default preset carries its name and trains in a
    # minute or two on 2 CPU cores (`bigmodel train --preset mlp --data digits --out runs/digits`).
    "mlp": {
        "model": dict(arch="mlp", hidden=64, n_hidden=1, connection="dense"),
        "train": dict(_EXAMPLE_TRAIN, max_steps=600, lr=3e-3, weight_decay=1e-4),
    },
    "multi-input": {
        "model": dict(arch="multi-input", extractor_hidden=32, features=16, merge="concat", hidden=32),
        "train": dict(_EXAMPLE_TRAIN, max_steps=600, lr=3e-3, weight_decay=1e-4),
    },
    "seq2seq": {
        "model": dict(arch="seq2seq", n_encoder_layer=2, n_decoder_layer=2, n_head=4, n_embd=64, d_ff=256, dropout=0.0),
        "train": dict(_EXAMPLE_TRAIN, max_steps=600, lr=3e-3, warmup_steps=100, eval_every=200, eval_tokens=500),
    },
    "rnn-seq2seq": {
        "model": dict(arch="rnn-seq2seq", cell="gru", attention="bahdanau", n_embd=64, hidden=128),
        "train": dict(_EXAMPLE_TRAIN, max_steps=600, lr=3e-3, warmup_steps=50, eval_every=200, eval_tokens=500),
    },
    "encoder": {
        "model": dict(arch="encoder", block_size=128, n_layer=2, n_head=4, n_embd=128, d_ff=512),
        "train": dict(_EXAMPLE_TRAIN, max_steps=1000, lr=1e-3, warmup_steps=50, batch_size=32, micro_batch=32),
    },
    "autoencoder": {
        "model": dict(arch="autoencoder", hidden=64, sparsity="l1", l1=1e-2),
        "train": dict(_EXAMPLE_TRAIN, max_steps=1000, lr=3e-3, weight_decay=0.0),
    },
}


def _close(name: str, options: list[str]) -> str:
    near = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    return f"did you mean {', '.join(near)}?" if near else f"valid keys: {', '.join(options)}"


def _coerce(key: str, annotation: str, value: Any) -> Any:
    """Convert a TOML/CLI value to the field's declared type, or raise ConfigError naming the key."""
    kinds = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    for kind in kinds:
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "bool" and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind == "str" and isinstance(value, str):
            return value
        if kind == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        if kind == "list[str]" and isinstance(value, str):  # --set train.regularize=matrix,embedding
            return [v.strip() for v in value.split(",") if v.strip()]
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {annotation}")


def _section_fields(section: str, arch: str = "gpt") -> dict[str, dataclasses.Field[Any]]:
    cls = MODEL_CONFIGS[arch] if section == "model" else TrainConfig
    return {f.name: f for f in fields(cls)}


def _set(raw: dict[str, dict[str, Any]], key: str, value: Any, arch: str = "gpt") -> None:
    section, _, name = key.partition(".")
    if section not in ("model", "train") or not name:
        raise ConfigError(f"unknown config key {key!r}: keys look like model.<field> or train.<field>")
    if key == "model.arch":
        _check(value == arch, key, value, f"{arch!r}, the arch this config was resolved for")
        return
    known = _section_fields(section, arch)
    if name not in known:
        where = f" (model.arch={arch!r})" if section == "model" and arch != "gpt" else ""
        raise ConfigError(f"unknown config key {key!r}{where}; {_close(name, sorted(known))}")
    raw[section][name] = _coerce(key, str(known[name].type), value)


def _resolve_arch(task: str | None, arch: Any, preset: str | None) -> tuple[str, str]:
    """(task, arch): explicit values first, then the preset's arch, then each one's default for the other."""
    if arch is None and preset in PRESETS:
        arch = PRESETS[preset]["model"].get("arch")
    if arch is not None and arch not in MODEL_CONFIGS:
        raise ConfigError(f"model.arch={arch!r} is invalid: expected one of {', '.join(MODEL_CONFIGS)}")
    if task is None:
        task = MODEL_CONFIGS[arch].default_task if arch is not None else "lm"
    if task not in TASK_ARCHS:
        raise ConfigError(f"unknown task {task!r}; {_close(task, sorted(TASK_ARCHS))}")
    arch = arch or TASK_ARCHS[task][0]
    if arch not in TASK_ARCHS[task]:
        raise ConfigError(
            f"model.arch={arch!r} cannot be trained on task {task!r}; it trains {', '.join(TASK_ARCHS[task])}"
        )
    return task, str(arch)


def _default_preset(arch: str) -> str:
    return "small" if arch == "gpt" else arch


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003). Values are TOML literals; bare words are strings."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r} is not of the form key=value (e.g. --set train.lr=3e-4)")
    value = value.strip()
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def resolve_config(
    preset: str | None = None,
    toml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    task: str | None = None,
) -> RunConfig:
    """Build a validated RunConfig: preset, then the TOML file, then `key=value` overrides.

    The task and the model family (`model.arch`) are settled first, since the arch decides which
    `model.*` keys exist: an explicit task or arch wins, else the preset's arch, else task `lm` with GPT.
    Without a preset, a GPT uses `small` and every other arch the preset named after it.
    """
    raw: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    file_data: dict[str, Any] = {}
    if toml_path is not None:
        path = Path(toml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing .toml file to --config")
        try:
            file_data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    for top, values in file_data.items():
        if top not in ("preset", "task") and (top not in ("model", "train") or not isinstance(values, dict)):
            raise ConfigError(f"unknown table [{top}] in {toml_path}; expected [model] and [train]")
    parsed = [parse_override(text) for text in overrides or []]
    arch = next((v for k, v in reversed(parsed) if k == "model.arch"), file_data.get("model", {}).get("arch"))
    name = preset or file_data.get("preset")
    if name is not None and name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; {_close(name, sorted(PRESETS))}")
    task, arch = _resolve_arch(task or file_data.get("task"), arch, name)
    name = name or _default_preset(arch)
    preset_arch = PRESETS[name]["model"].get("arch", "gpt")
    if preset_arch != arch:
        raise ConfigError(
            f"preset {name!r} is for model.arch={preset_arch!r}, not {arch!r}; "
            f"choose a preset for {arch!r} (e.g. {_default_preset(arch)!r}) or drop the model.arch setting"
        )
    for section, values in PRESETS[name].items():
        for k, v in values.items():
            _set(raw, f"{section}.{k}", v, arch)
    for top, values in file_data.items():
        if top in ("model", "train"):
            for k, v in values.items():
                _set(raw, f"{top}.{k}", v, arch)
    for key, value in parsed:
        _set(raw, key, value, arch)
    return RunConfig(
        preset=name,
        task=task,
        model=MODEL_CONFIGS[arch](**raw["model"]),
        train=TrainConfig(**raw["train"]),
    )


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from its dict form (e.g. a parsed config.toml)."""
    task, arch = _resolve_arch(data.get("task"), data.get("model", {}).get("arch"), None)
    raw: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for section in ("model", "train"):
        for k, v in data.get(section, {}).items():
            _set(raw, f"{section}.{k}", v, arch)
    return RunConfig(
        preset=str(data.get("preset", _default_preset(arch))),
        task=task,
        model=MODEL_CONFIGS[arch](**raw["model"]),
        train=TrainConfig(**raw["train"]),
    )


def load_toml(path: str | Path) -> RunConfig:
    return config_from_dict(tomllib.loads(Path(path).read_text(encoding="utf-8")))


def to_toml(config: RunConfig) -> str:
    """Serialise as TOML (None values are omitted: TOML has no null, and None is every such field's default)."""
    lines = [f"preset = {json.dumps(config.preset)}", f"task = {json.dumps(config.task)}"]
    for section in ("model", "train"):
        lines += ["", f"[{section}]"]
        if section == "model":
            lines.append(f"arch = {json.dumps(arch_of(config.model))}")
        for k, v in dataclasses.asdict(getattr(config, section)).items():
            if v is None:
                continue
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, float):
                lines.append(f"{k} = {v!r}")
            else:
                lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def diff_configs(a: ModelConfig | TrainConfig, b: ModelConfig | TrainConfig, prefix: str) -> list[str]:
    """Fields that differ, as 'prefix.field: a -> b' strings (a different model family is one difference)."""
    if type(a) is not type(b):
        return [f"{prefix}.arch: {arch_of(a)!r} -> {arch_of(b)!r}"]
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return [f"{prefix}.{k}: {da[k]!r} -> {db[k]!r}" for k in da if da[k] != db[k]]
