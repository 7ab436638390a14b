"""`bigmodel export` and `bigmodel import`: model directories to and from the Hugging Face layout.

bigmodel's own model directories already are Hugging Face GPT-2 directories, so export normalises and
copies (from a run or a checkpoint); import reads what transformers or the Hub wrote (sharded
safetensors, vocab.json + merges.txt, and pytorch_model.bin only with --allow-pickle) and writes one
model.safetensors and one tokenizer.json.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError
from bigmodel.evaluation import resolve_model_dir
from bigmodel.models.gpt import GPT


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose another --out")


def convert(source: str | Path, out: str | Path, allow_pickle: bool = False) -> Path:
    """Read any supported GPT-2 directory at `source` and write a normalised model directory at `out`."""
    src, dst = Path(source), Path(out)
    _check_out(dst)
    model = GPT.from_pretrained(src, allow_pickle=allow_pickle)
    tok = Tokenizer.from_pretrained(src)
    model.save_pretrained(dst, tok)
    c = model.config
    print(
        f"wrote {dst}: GPT-2 {c.n_layer} layers x {c.n_embd} wide, {model.num_params() / 1e6:.1f}M parameters, "
        f"vocab {c.vocab_size}, context {c.block_size}",
        file=sys.stderr,
    )
    return dst


def run_export(args: Any) -> int:
    convert(resolve_model_dir(args.model), args.out)
    return 0


def run_import(args: Any) -> int:
    if not Path(args.source).is_dir():
        raise UserError(f"{args.source} is not a folder; pass a model directory with config.json")
    convert(args.source, args.out, allow_pickle=args.allow_pickle)
    return 0
