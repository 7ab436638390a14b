"""The command line: --help with examples, one-line user errors with exit status 2, eval and generate output.

Most checks call `bigmodel.cli.main` in-process (cheap); the end-to-end test runs the real command in
subprocesses (exit statuses, streams, no traceback).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bigmodel.cli import main
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.train.loop import TrainResult
from conftest import run_cli, tiny_gpt, write_corpus

VERBS = ["prepare", "train", "eval", "generate", "demo"]


@pytest.mark.parametrize("verb", VERBS)
def test_help_has_an_example(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: bigmodel {verb}" in out
    assert "example" in out and f"bigmodel {verb} " in out.split("example", 1)[1]


def test_top_level_help_lists_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(v in out for v in VERBS)


def _user_error(argv: list[str], capsys: pytest.CaptureFixture[str], verb: str) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"bigmodel {verb}: error: "), lines[0]
    assert "Traceback" not in captured.err
    assert captured.out == ""
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained char-level model directory with its tokenizer (enough for generate's checks)."""
    path = tmp_path_factory.mktemp("model")
    tok = Tokenizer.char()
    tiny_gpt(tok.vocab_size, block_size=64).save_pretrained(path, tok)
    return path


def test_user_errors_are_one_line_with_status_2(
    tmp_path: Path, bpe_data: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = _user_error(["prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "d")], capsys, "prepare")
    assert "nope.txt does not exist" in msg
    assert not (tmp_path / "d").exists()

    msg = _user_error(
        ["train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "r1"), "--preset", "tiny"],
        capsys,
        "train",
    )
    assert "nodata is not a data directory" in msg and "bigmodel prepare" in msg

    msg = _user_error(
        ["train", "--data", str(bpe_data), "--out", str(tmp_path / "r2"), "--preset", "tiny", "--set", "train.lrr=0.1"],
        capsys,
        "train",
    )
    assert "unknown config key 'train.lrr'" in msg and "lr" in msg.split("train.lrr", 1)[1]
    assert not (tmp_path / "r2").exists()

    msg = _user_error(
        ["train", "--data", str(bpe_data), "--out", str(tmp_path / "r3"), "--preset", "tiny", "--set", "train.lr=-1"],
        capsys,
        "train",
    )
    assert "train.lr=-1" in msg

    msg = _user_error(["eval", str(tmp_path), "--data", str(bpe_data)], capsys, "eval")
    assert "is neither a model directory" in msg

    msg = _user_error(["generate", str(model_dir), "--prompt", "hi", "--temperature", "0"], capsys, "generate")
    assert "temperature=0.0 must be > 0" in msg

    msg = _user_error(["generate", str(model_dir), "--prompt", "x" * 60, "--max-new-tokens", "10"], capsys, "generate")
    assert "context window of 64 tokens" in msg


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--debug", "prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("bigmodel prepare: error:")


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "somewhere", "--max-new-tokens", "0"])
    assert info.value.code == 2
    assert "not a positive integer" in capsys.readouterr().err


def test_eval_prints_one_json_line(
    tiny_run: tuple[TrainResult, object], bpe_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = tiny_run[0]
    assert main(["eval", str(result.run_dir), "--data", str(bpe_data)]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    scores = json.loads(out)
    assert set(scores) == {"loss", "perplexity", "bits_per_byte", "tokens"}
    assert result.val is not None
    assert scores["loss"] == pytest.approx(result.val["loss"], rel=1e-5)  # same model, same split
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))
    manifest = json.loads((bpe_data / "manifest.json").read_text())
    val = manifest["splits"]["val"]
    assert scores["tokens"] == val["tokens"] - 1  # every val token but the first is predicted
    assert scores["bits_per_byte"] == pytest.approx(scores["loss"] / math.log(2) * val["tokens"] / val["bytes"])

    assert (
        main(
            ["eval", str(result.run_dir / "final"), "--data", str(bpe_data), "--split", "train", "--max-tokens", "500"]
        )
        == 0
    )
    limited = json.loads(capsys.readouterr().out)
    assert 400 < limited["tokens"] <= 500  # an upper bound: evenly spaced windows, some shorter


def test_eval_refuses_data_with_another_tokenizer(
    tiny_run: tuple[TrainResult, object], char_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = _user_error(["eval", str(tiny_run[0].run_dir), "--data", str(char_data)], capsys, "eval")
    assert "tokenized with another tokenizer" in msg


def test_generate_prints_text_on_stdout_and_is_reproducible(
    tiny_run: tuple[TrainResult, object], capsys: pytest.CaptureFixture[str]
) -> None:
    run = str(tiny_run[0].run_dir)
    outs = []
    for seed in ("1", "1", "2"):
        assert main(["generate", run, "--prompt", "HAMLET:", "--seed", seed, "--max-new-tokens", "24"]) == 0
        captured = capsys.readouterr()
        assert captured.out.startswith("HAMLET:")
        assert "tokens/s" not in captured.out and "tokens/s" in captured.err  # timings on stderr only
        outs.append(captured.out)
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]

    assert (
        main(["generate", run, "--prompt", "HAMLET:", "--seed", "3", "--max-new-tokens", "8", "--num-samples", "2"])
        == 0
    )
    samples = capsys.readouterr().out.split("\n" + "-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("HAMLET:") for s in samples)

    greedy = []
    for _ in range(2):  # no prompt: continue from the end-of-text token, i.e. start a new document
        assert main(["generate", run, "--greedy", "--max-new-tokens", "8"]) == 0
        greedy.append(capsys.readouterr())
    assert greedy[0].out == greedy[1].out and len(greedy[0].out) > 1
    assert "generated" in greedy[0].err


def test_end_to_end_via_subprocess(tmp_path: Path) -> None:
    """prepare -> train (tiny) -> eval -> generate, as a user runs them."""
    write_corpus(tmp_path / "corpus", n_docs=6, lines=30, seed=3)
    data, run = tmp_path / "data", tmp_path / "run"

    p = run_cli("prepare", str(tmp_path / "corpus"), "--out", str(data), "--vocab-size", "300")
    assert p.returncode == 0, p.stderr
    assert "prepared" in p.stderr and (data / "manifest.json").is_file()

    p = run_cli(
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--set",
        "model.block_size=32",
        "--set",
        "train.max_steps=8",
        "--set",
        "train.checkpoint_every=4",
    )
    assert p.returncode == 0, p.stderr
    assert "8 steps" in p.stderr and (run / "final" / "model.safetensors").is_file()

    p = run_cli("eval", str(run), "--data", str(data))
    assert p.returncode == 0, p.stderr
    scores = json.loads(p.stdout)
    assert set(scores) == {"loss", "perplexity", "bits_per_byte", "tokens"}
    assert 0 < scores["loss"] < math.log(300)

    p = run_cli("generate", str(run), "--prompt", "HAMLET:", "--seed", "1", "--max-new-tokens", "16")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("HAMLET:") and "tokens/s" in p.stderr and "tokens/s" not in p.stdout

    p = run_cli("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run2"))
    assert p.returncode == 2
    assert p.stderr.startswith("bigmodel train: error: ") and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr and p.stdout == ""


# ----- generate: stop strings, repetition penalty, min-p, int8, several samples ------------------------------------
PROMPT = "ab"


@pytest.fixture(scope="module")
def varied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level model whose greedy continuation of PROMPT varies (ASCII runs and other bytes)."""
    path = tmp_path_factory.mktemp("varied")
    tiny_gpt(257, block_size=64, scale=3.0, pos_scale=10.0, seed=3).save_pretrained(path, Tokenizer.char())
    return path


def _generate(capsys: pytest.CaptureFixture[str], model: Path, *args: str) -> str:
    capsys.readouterr()
    assert main(["generate", str(model), "--prompt", PROMPT, "--max-new-tokens", "40", *args]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err
    return captured.out


def _api_text(model_dir: Path, dtype: str = "fp32", **kwargs: object) -> str:
    from bigmodel.generation import generate_text, load_for_inference

    model, tok = load_for_inference(str(model_dir), dtype)
    return generate_text(model, tok, PROMPT, max_new_tokens=40, **kwargs)[0].text


def test_generate_loads_onto_the_default_device(varied_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU when there is one, as eval and train: here the meta device stands in for it."""
    from bigmodel import hardware
    from bigmodel.generation import load_for_inference

    monkeypatch.setattr(hardware, "default_device", lambda: torch.device("meta"))
    model, _ = load_for_inference(str(varied_model_dir), "fp32")
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_generate_int8_stays_on_the_cpu_where_the_gpu_has_no_int8_kernel(
    varied_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bigmodel import hardware
    from bigmodel.compress import quantize
    from bigmodel.generation import load_for_inference

    monkeypatch.setattr(hardware, "default_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(quantize, "int8pack_runs_on", lambda device: device.type == "cpu")
    with pytest.warns(UserWarning, match="no cuda kernel for int8 weights.*decoding on the CPU"):
        model, _ = load_for_inference(str(varied_model_dir), "int8")
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}


def test_generate_stop_text_is_not_printed(varied_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = _generate(capsys, varied_model_dir, "--greedy", "--dtype", "fp32")
    assert full.startswith(PROMPT) and full.endswith("\n")
    text = full[len(PROMPT) : -1]
    assert text == _api_text(varied_model_dir)
    k = next(k for k in range(3, len(text) - 3) if all(32 <= ord(c) < 127 for c in text[k : k + 3]))
    stop = text[k : k + 3]
    prefix = text[: text.index(stop)]
    out = _generate(capsys, varied_model_dir, "--greedy", "--dtype", "fp32", "--stop", "\x00zz", "--stop", stop)
    assert out == PROMPT + prefix + "\n" and stop not in out[len(PROMPT) :]

    out = _generate(capsys, varied_model_dir, "--greedy", "--dtype", "fp32", "--stop", stop, "--num-samples", "2")
    samples = out.split("\n" + "-" * 40 + "\n")
    assert samples == [PROMPT + prefix + "\n"] * 2


def test_generate_repetition_penalty_and_min_p(varied_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    greedy = _generate(capsys, varied_model_dir, "--greedy", "--dtype", "fp32")
    penalised = _generate(capsys, varied_model_dir, "--greedy", "--dtype", "fp32", "--repetition-penalty", "3")
    assert penalised == PROMPT + _api_text(varied_model_dir, repetition_penalty=3.0) + "\n"
    assert penalised != greedy

    sample = ["--dtype", "fp32", "--seed", "1", "--temperature", "1.5", "--top-k", "0"]
    assert _generate(capsys, varied_model_dir, *sample) != greedy
    assert _generate(capsys, varied_model_dir, *sample, "--min-p", "1.0") == greedy  # only the top token is left


def test_generate_with_int8_weights(
    varied_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bigmodel.compress import quantize

    quantized: list[object] = []
    real = quantize.quantize_int8
    monkeypatch.setattr(quantize, "quantize_int8", lambda m: quantized.append(m) or real(m))
    out = _generate(capsys, varied_model_dir, "--greedy", "--dtype", "int8")
    assert len(quantized) == 1  # the weights really were quantized
    assert out == PROMPT + _api_text(varied_model_dir, "int8") + "\n"
    assert len(out) > len(PROMPT) + 10


@pytest.mark.parametrize(
    "args, match",
    [
        (["--min-p", "1.5"], r"min_p=1.5 must be in \[0, 1\]"),
        (["--min-p", "-0.5"], r"min_p=-0.5 must be in \[0, 1\]"),
        (["--repetition-penalty", "0"], "repetition_penalty=0.0 must be > 0"),
        (["--top-p", "0"], r"top_p=0.0 must be in \(0, 1\]"),
        (["--num-samples", "2", "--max-new-tokens", "70"], "context window of 64 tokens"),
    ],
)
def test_generate_bad_values_exit_2(
    varied_model_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], match: str
) -> None:
    import re

    argv = ["generate", str(varied_model_dir), "--prompt", PROMPT, "--max-new-tokens", "8", *args]
    msg = _user_error(argv, capsys, "generate")
    assert re.search(match, msg), msg


def test_generate_bad_dtype_is_an_argparse_error(varied_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", str(varied_model_dir), "--dtype", "int4"])
    assert info.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err
