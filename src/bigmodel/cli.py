"""Command line: argument parsing only. Each verb calls one run_<verb>(args) in the module that owns it."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

EXIT_USER_ERROR = 2
DTYPES = ["auto", "fp32", "bf16", "int8"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="bigmodel", description="Train, evaluate and sample GPT models.", formatter_class=fmt
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser(
        "prepare",
        help="turn text into token shards",
        formatter_class=fmt,
        epilog="example:\n  bigmodel prepare shakespeare --out data/shakespeare\n"
        "  bigmodel prepare notes/ books.jsonl --tokenizer char --out data/mine",
    )
    s.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="text files, folders (*.txt, *.jsonl with a 'text' field) or a built-in corpus (shakespeare, genre-train)",
    )
    s.add_argument("--out", required=True, help="data directory to create")
    s.add_argument("--tokenizer", default="bpe", help="bpe (trained here), char (bytes) or a tokenizer.json path")
    s.add_argument("--vocab-size", type=_positive_int, default=8192, help="BPE vocabulary size (default 8192)")
    s.add_argument("--val-fraction", type=float, default=0.1, help="fraction of documents held out (default 0.1)")
    s.add_argument("--workers", type=_positive_int, default=None, help="encoding threads (default: all cores)")
    s.add_argument("--shard-tokens", type=_positive_int, default=100_000_000, help="tokens per shard file")
    s.add_argument(
        "--errors",
        choices=["strict", "replace", "skip"],
        default="strict",
        help="what to do with bytes that are not UTF-8 (default strict: stop and name the offset)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    t = sub.add_parser(
        "train",
        help="train a model on a data directory (one process, or every rank under torchrun)",
        formatter_class=fmt,
        epilog="example:\n  bigmodel train --data data/shakespeare --out runs/s1 --preset small "
        "--set train.max_minutes=5\n  bigmodel train --data data/shakespeare --out runs/s1 "
        "--resume auto\n  torchrun --nproc-per-node 2 -m bigmodel train --data data/shakespeare --out runs/s2 "
        "--set train.parallel=fsdp"
        "\n  bigmodel train --preset mlp --data digits --out runs/digits --set model.connection=sparse"
        "\n  bigmodel train --task seq2seq --data numbers --out runs/translator",
    )
    t.add_argument(
        "--data",
        required=True,
        help="data directory from `bigmodel prepare`; for other tasks a data set: digits, breast-cancer, genre, "
        "numbers, dates, or a .npy/.csv/.tsv file or folder",
    )
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--config", help="TOML file with [model] and [train] tables")
    t.add_argument(
        "--preset",
        help="named model + training shape: tiny, small (default), gpt2, gpt2-medium; for the other families "
        "mlp, multi-input, seq2seq, rnn-seq2seq, encoder, autoencoder",
    )
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.lr=3e-4 (repeatable)",
    )
    t.add_argument("--resume", metavar="auto|PATH", help="continue from the newest complete checkpoint or PATH")
    t.add_argument(
        "--task",
        help="what to train: lm (default), classify, seq2seq, mlm, autoencode (docs/zoo.md); "
        "a preset or model.arch implies its task",
    )

    pl = sub.add_parser(
        "plan",
        help="memory per rank for DDP and FSDP, before you launch",
        formatter_class=fmt,
        epilog="example:\n  bigmodel plan --preset gpt2 --world-size 8 --memory 80GiB\n"
        "  bigmodel plan --config my.toml --world-size 2 --set train.micro_batch=4",
    )
    pl.add_argument("--preset", help="named model + training shape (default small)")
    pl.add_argument("--config", help="TOML file with [model] and [train] tables")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    pl.add_argument("--world-size", type=_positive_int, default=1, help="number of ranks (default 1)")
    pl.add_argument("--memory", help="memory per rank to check against, e.g. 80GiB")
    pl.add_argument(
        "--vocab-size", type=_positive_int, default=50257, help="vocabulary when the config leaves it to the data"
    )

    e = sub.add_parser(
        "eval",
        help="held-out scores: loss, perplexity, bits per byte (GPT), or the task's metrics (other families)",
        formatter_class=fmt,
        epilog="example:\n  bigmodel eval runs/s1 --data data/shakespeare\n  bigmodel eval runs/digits --data digits"
        "\n  bigmodel eval runs/translator --data numbers --max-tokens 200",
    )
    e.add_argument("model", metavar="MODEL_OR_RUN", help="model directory or run directory")
    e.add_argument(
        "--data", required=True, help="data directory prepared with the model's tokenizer, or the model's data set"
    )
    e.add_argument("--split", default="val", choices=["val", "train"])
    e.add_argument(
        "--max-tokens", type=_positive_int, default=None, help="evaluate at most this many tokens (examples: zoo)"
    )
    e.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="autocast for fp32 weights")
    e.add_argument("--dtype", default="fp32", choices=DTYPES, help="weights (e.g. int8 to measure its quality)")

    g = sub.add_parser(
        "generate",
        help="sample text from a model",
        formatter_class=fmt,
        epilog="example:\n  bigmodel generate runs/s1 --prompt 'ROMEO:' --max-new-tokens 100 --seed 1",
    )
    g.add_argument("model", metavar="MODEL_OR_RUN", help="model directory or run directory")
    g.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=100)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, e.g. 0.95")
    g.add_argument("--num-samples", type=_positive_int, default=1)
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p * the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop before this text (repeatable)")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--dtype", default="auto", choices=DTYPES, help="weights: auto (bf16 where native, else fp32)")

    x = sub.add_parser(
        "export",
        help="write a model as a Hugging Face model directory",
        formatter_class=fmt,
        epilog="example:\n  bigmodel export runs/s1 --format hf --out exported/s1",
    )
    x.add_argument("model", metavar="MODEL_OR_RUN", help="model directory, run directory or checkpoint")
    x.add_argument("--format", default="hf", choices=["hf"], help="hf: config.json + model.safetensors + tokenizer")
    x.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")

    m = sub.add_parser(
        "import",
        help="convert a Hugging Face GPT-2 directory into a bigmodel model directory",
        formatter_class=fmt,
        epilog="example:\n  bigmodel import ~/models/gpt2 --out models/gpt2\n"
        "  bigmodel import old-gpt2/ --out models/gpt2 --allow-pickle   # a pytorch_model.bin",
    )
    m.add_argument("source", help="folder with config.json and (sharded) safetensors, or pytorch_model.bin")
    m.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
    m.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pytorch_model.bin with torch.load(weights_only=True); never needed for safetensors",
    )

    f = sub.add_parser(
        "features",
        help="fit a PCA / TruncatedSVD / IncrementalPCA / wavelet features on .npy or .csv, or transform",
        formatter_class=fmt,
        epilog="example:\n  bigmodel features fit pca data.npy --n-components 0.95 --out pca/\n"
        "  bigmodel features transform pca/ data.npy --out features.npy\n"
        "  bigmodel features fit wavelet signals.npy --wavelet sym4 --level 5 --out wav/",
    )
    fsub = f.add_subparsers(dest="action", required=True, metavar="ACTION")
    ff = fsub.add_parser("fit", help="fit an estimator and save it (safetensors + JSON)")
    ff.add_argument("kind", choices=["pca", "truncated-svd", "incremental-pca", "wavelet"])
    ff.add_argument("input", help=".npy (memory-mapped) or .csv matrix, rows are samples")
    ff.add_argument("--out", required=True, help="folder for estimator.safetensors + estimator.json")
    ff.add_argument("--n-components", default=None, help="a count, or a variance fraction such as 0.95 (PCA)")
    ff.add_argument("--whiten", action="store_true", help="scale components to unit variance (PCA)")
    ff.add_argument("--batch-size", type=_positive_int, default=None, help="rows per batch (incremental-pca)")
    ff.add_argument("--wavelet", default="db4", help="haar, db1-db8, sym2-sym8, coif1-coif5 (wavelet)")
    ff.add_argument("--level", type=int, default=None, help="decomposition levels; default the deepest (wavelet)")
    ff.add_argument("--mode", default="symmetric", help="symmetric | periodization | zero (wavelet)")
    ft = fsub.add_parser("transform", help="transform a matrix with a saved estimator")
    ft.add_argument("model", help="folder written by `bigmodel features fit`")
    ft.add_argument("input", help=".npy or .csv matrix")
    ft.add_argument("--out", required=True, help="where to write the features (.npy)")

    n = sub.add_parser(
        "ensemble",
        help="evaluate an ensemble of language models, or average checkpoints into one model",
        formatter_class=fmt,
        epilog="example:\n  bigmodel ensemble eval runs/a runs/b runs/c --data data/shakespeare\n"
        "  bigmodel ensemble eval runs/a runs/b --data data/shakespeare --mode logprob --weights 2 1\n"
        "  bigmodel ensemble average runs/s1 --last 3 --out models/s1-avg",
    )
    nsub = n.add_subparsers(dest="action", required=True, metavar="ACTION")
    ne = nsub.add_parser(
        "eval",
        help="held-out loss and bits per byte of each member and of their ensemble",
        formatter_class=fmt,
        epilog="example:\n  bigmodel ensemble eval runs/a runs/b runs/c --data data/shakespeare",
    )
    ne.add_argument("models", nargs="+", metavar="MODEL_OR_RUN", help="model or run directories (same tokenizer)")
    ne.add_argument("--data", required=True, help="data directory prepared with the models' tokenizer")
    ne.add_argument("--split", default="val", choices=["val", "train"])
    ne.add_argument(
        "--mode",
        default="prob",
        choices=["prob", "logprob"],
        help="average next-token probabilities (default, a mixture) or log-probabilities (renormalised)",
    )
    ne.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per model (default equal)")
    ne.add_argument("--max-tokens", type=_positive_int, default=None, help="evaluate at most this many tokens")
    ne.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="autocast for fp32 weights")
    ne.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    na = nsub.add_parser(
        "average",
        help="uniform average of the weights of a run's last K checkpoints (or of model directories)",
        formatter_class=fmt,
        epilog="example:\n  bigmodel ensemble average runs/s1 --last 3 --out models/s1-avg\n"
        "  bigmodel ensemble average runs/s1/checkpoints/step-0000500 runs/s1/final --out models/avg",
    )
    na.add_argument("sources", nargs="+", metavar="RUN_OR_DIRS", help="one run directory, or several model directories")
    na.add_argument("--last", type=_positive_int, default=None, help="average the run's newest K checkpoints")
    na.add_argument("--out", required=True, help="model directory to write (must not exist or be empty)")

    d = sub.add_parser(
        "demo",
        help="prepare -> train -> eval -> generate on built-in Shakespeare",
        formatter_class=fmt,
        epilog="example:\n  bigmodel demo --out runs/demo --minutes 5",
    )
    d.add_argument("--out", default="runs/demo", help="run directory (data goes to OUT/data)")
    d.add_argument("--minutes", type=float, default=5.0, help="training budget in minutes (default 5)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    return p


def _runner(verb: str) -> Callable[[Any], int]:
    # Imported on demand: `bigmodel --help` stays fast and each verb loads only what it uses.
    if verb == "prepare":
        from bigmodel.data.prepare import run_prepare

        return run_prepare
    if verb == "train":
        from bigmodel.train.loop import run_train

        return run_train
    if verb == "eval":
        from bigmodel.evaluation import run_eval

        return run_eval
    if verb == "generate":
        from bigmodel.generation import run_generate

        return run_generate
    if verb in ("export", "import"):
        from bigmodel.convert import run_export, run_import

        return run_export if verb == "export" else run_import
    if verb == "plan":
        from bigmodel.train.plan import run_plan

        return run_plan
    if verb == "features":
        from bigmodel.features.store import run_features

        return run_features
    if verb == "ensemble":
        from bigmodel.ensemble import run_ensemble

        return run_ensemble
    from bigmodel.demo import run_demo

    return run_demo


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _runner(args.verb)(args)
    except ValueError as e:  # UserError, ConfigError, and invalid generation parameters
        if args.debug or os.environ.get("BIGMODEL_DEBUG"):
            traceback.print_exc()
        print(f"bigmodel {args.verb}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
