"""`bigmodel demo`: the main job on the built-in corpus, end to end, in about six minutes on 2 CPU cores.

prepare shakespeare -> train the `small` preset under a wall-clock budget -> evaluate on held-out plays ->
three samples -> OUT/report.md (figures, samples, loss plot). OUT/final is a Hugging Face model directory.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bigmodel import atomic, hardware
from bigmodel.config import resolve_config
from bigmodel.data.prepare import prepare
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.models.gpt import GPT
from bigmodel.train.loop import train

PROMPTS = ["ROMEO:", "First Citizen:\n", "KING HENRY:"]
RUN_FILES = ["checkpoints", "final", "tensorboard", "metrics.csv", "loss.png", "config.toml", "report.md"]


def run_demo(args: Any) -> int:
    out = Path(args.out)
    t0 = time.time()
    data = out / "data"
    if not (data / "manifest.json").is_file():
        prepare(["shakespeare"], data, tokenizer="bpe", vocab_size=8192, overwrite=True)
    if (out / "report.md").exists():  # a previous demo: start over in the same place
        print(f"replacing the previous demo in {out}", file=sys.stderr)
        for name in RUN_FILES:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    config = resolve_config("small", None, [f"train.max_minutes={args.minutes}", *args.set])
    result = train(config, data, out)

    model = GPT.from_pretrained(out / "final")
    tok = Tokenizer.from_pretrained(out / "final")
    samples = []
    for i, prompt in enumerate(PROMPTS):
        ids = model.generate(
            torch.tensor([tok.encode(prompt)]),
            max_new_tokens=120,
            do_sample=True,
            temperature=0.8,
            top_k=200,
            eos_token_id=tok.eot_id,
            seed=i,
        )
        text = tok.decode([t for t in ids[0].tolist() if t != tok.eot_id])
        samples.append(text)

    val, nan = result.val or {}, float("nan")
    bpb = val.get("bits_per_byte", nan)
    for i, s in enumerate(samples):
        print(f"--- sample {i + 1} ---\n{s}\n")
    summary = (
        f"held-out bits per byte: {bpb:.3f} (val loss {val.get('loss', nan):.3f} nats/token, "
        f"{val.get('tokens', 0):,} tokens of unseen plays) after {result.steps} steps / "
        f"{result.tokens:,} tokens of training"
    )
    print(summary)
    device = hardware.default_device()
    amp = hardware.autocast_dtype(config.train.precision, device)
    report = [
        "# bigmodel demo report",
        "",
        f"- held-out bits per byte: **{bpb:.3f}** (goal: at most 2.5)",
        f"- val loss: {val.get('loss', nan):.4f} nats/token, perplexity {val.get('perplexity', nan):.1f}, "
        f"over {val.get('tokens', 0):,} tokens of held-out plays",
        f"- training: {result.steps} steps, {result.tokens:,} tokens, {result.train_loss:.3f} final train loss, "
        f"stopped by {result.stop_reason}",
        f"- model: `small` preset, {model.num_params() / 1e6:.2f}M parameters, "
        f"{'bf16 autocast' if amp else 'fp32'} on {device.type}, {torch.get_num_threads()} threads",
        f"- wall clock: {(time.time() - t0) / 60:.1f} min in all",
        "",
        "![loss](loss.png)",
        "",
        "## Samples (temperature 0.8, top-k 200)",
        "",
    ]
    for prompt, s in zip(PROMPTS, samples, strict=True):
        report += [f"Prompt `{prompt.strip()}`:", "", "```", s.strip(), "```", ""]
    report += [
        "## Files",
        "",
        "- `final/`: model directory (transformers `GPT2LMHeadModel.from_pretrained` loads it)",
        "- `metrics.csv`, `loss.png`, `config.toml`, `checkpoints/`",
        "",
    ]
    atomic.write_text(out / "report.md", "\n".join(report))
    print(f"report: {out / 'report.md'}", file=sys.stderr)
    return 0
