"""The command line: every bad input is one line on stderr and exit 2; eval and generate work."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import corpus_file

from adadepth.cli import main

# A run of a few steps on a slice of the corpus, for the checks that need a fresh run folder.
QUICK = ["--steps", "2", "model.d_model=32", "model.n_layers=2", "model.d_ff=64",
         "data.block_size=16", "train.batch_size=2", "train.eval_batches=2"]


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def serve(run: Path, out: Path, capsys: pytest.CaptureFixture, settings: str,
          decode_batches: str = "2") -> tuple[dict, str, list[dict]]:
    """`adadepth eval`, `generate` (two samples) and `bench` (small) on a run folder, as a user
    runs them: its eval.json, generate's stderr (the measurement it prints), bench's rows."""
    assert main(["eval", str(run), "--batches", "2"]) == 0
    report = json.loads((run / "eval.json").read_text())
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "6",
                 "--num-samples", "2"]) == 0
    err = capsys.readouterr().err
    assert main(["bench", str(run), "--settings", settings, "--prefill-batch", "2",
                 "--prefill-len", "32", "--decode-batches", decode_batches, "--decode-tokens",
                 "4", "--reps", "1", "--out", str(out)]) == 0
    return report, err, json.loads((out / "bench.json").read_text())["rows"]


def assert_user_error(capsys: pytest.CaptureFixture, *argv: str, match: str = "") -> str:
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip("\n").split("\n")
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("adadepth: error: "), err
    assert "Traceback" not in err
    assert match.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return corpus_file(tmp_path_factory, 60_000)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("quick") / "run"
    assert main(["pretrain", "--corpus", str(corpus), "--out", str(out), *QUICK]) == 0
    return out


@pytest.mark.parametrize("argv, match", [
    (["pretrain", "--preset", "huge"], "unknown preset"),
    (["pretrain", "--corpus", "no-such-corpus"], "unknown corpus"),
    (["pretrain", "--corpus", "missing/file.txt"], "no such file"),
    (["pretrain", "--tokenizer", "morse"], "unknown tokenizer"),
    (["pretrain", "model.colour=red"], "model.colour: unknown key"),
    (["pretrain", "optimiser.lr=1"], "optimiser: unknown key"),
    (["pretrain", "--steps", "0"], "not positive"),
    (["pretrain", "--steps", "many"], "not an integer"),
    (["pretrain", "model.d_model=0"], "model.d_model"),
    (["pretrain", "data.block_size=-1"], "data.block_size"),
    (["pretrain", "model.n_heads=3"], "heads"),
    (["pretrain", "train.device=tpu"], "device"),
    (["frobnicate"], "invalid choice"),
    (["eval"], "required"),
])
def test_bad_pretrain_input(capsys: pytest.CaptureFixture, tmp_path: Path, argv: list[str],
                            match: str) -> None:
    if argv[0] == "pretrain":
        argv = [*argv, "--out", str(tmp_path / "run")]
    assert_user_error(capsys, *argv, match=match)


def test_bad_data_files(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Café, naïve façade\n".encode("latin-1") * 100)
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.\n" * 5)
    out = tmp_path / "run"
    for path, match in [(empty, "empty"), (blank, "empty"), (latin1, "UTF-8"),
                        (short, "too short")]:
        assert_user_error(capsys, "pretrain", "--corpus", path, "--out", out, match=match)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "table.csv").write_text("a,b\n")
    assert_user_error(capsys, "pretrain", "--corpus", folder, "--out", out, match="holds no")


def test_missing_or_unfinished_run_folders(capsys: pytest.CaptureFixture, tmp_path: Path,
                                           quick_run: Path) -> None:
    for cmd in (["eval"], ["generate", "--prompt", "a"]):
        assert_user_error(capsys, *cmd, tmp_path / "nowhere", match="does not exist")
        assert_user_error(capsys, *cmd, tmp_path, match="not an adadepth run folder")
    unfinished = tmp_path / "unfinished"  # killed before its first checkpoint
    shutil.copytree(quick_run, unfinished)
    for ckpt in unfinished.glob("ckpt-*"):
        shutil.rmtree(ckpt)
    assert_user_error(capsys, "eval", unfinished, match="no finished checkpoint")


def test_resume_into_a_run_of_another_shape(capsys: pytest.CaptureFixture, tmp_path: Path,
                                            corpus: Path, quick_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    assert_user_error(capsys, "pretrain", "--corpus", corpus, "--out", run, "--resume",
                      *QUICK, "model.d_model=64", match="another configuration")


@pytest.mark.parametrize("edit, match", [
    ({"d_model": 64}, "different model shape"),
    ({"n_layers": 3}, "does not fit"),
    ({"d_model": 0}, "d_model"),
    ({"unknown_field": 1}, "unknown"),
])
def test_eval_of_weights_that_do_not_fit_the_config(capsys: pytest.CaptureFixture,
                                                    tmp_path: Path, quick_run: Path,
                                                    edit: dict, match: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    meta = json.loads((run / "config.json").read_text())
    meta["model"].update(edit)
    (run / "config.json").write_text(json.dumps(meta))
    assert_user_error(capsys, "eval", run, match=match)
    assert_user_error(capsys, "generate", run, "--prompt", "a", match=match)


def test_eval_of_a_damaged_weights_file(capsys: pytest.CaptureFixture, tmp_path: Path,
                                        quick_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    weights = next(run.glob("ckpt-*/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    assert_user_error(capsys, "eval", run, match="damaged")


def test_generate_bad_prompts(capsys: pytest.CaptureFixture, tiny_backbone: Path) -> None:
    assert_user_error(capsys, "generate", tiny_backbone, "--prompt", "\u20ac", match="vocabulary")
    assert_user_error(capsys, "generate", tiny_backbone, "--prompt", "", match="empty")
    assert_user_error(capsys, "generate", tiny_backbone, "--prompt", "A",
                      "--max-new-tokens", "1000", match="context")


def test_config_file_flags_and_overrides(capsys: pytest.CaptureFixture, tmp_path: Path,
                                         corpus: Path) -> None:
    """Defaults < --config YAML < explicit flags < key=value overrides."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "preset": "tiny", "model": {"d_model": 32, "n_layers": 2, "d_ff": 64},
        "data": {"corpus": "not-used-because-of-the-flag", "block_size": 16},
        "optim": {"lr": 0.005, "warmup_steps": 1},
        "train": {"steps": 50, "batch_size": 2, "eval_batches": 2, "seed": 7},
    }))
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "pretrain", "--config", recipe, "--corpus", corpus,
                                "--steps", "3", "--out", out, "optim.lr=0.002")
    assert code == 0, err
    assert json.loads(stdout)["steps"] == 3
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["data"]["corpus"] == str(corpus)  # flag beats file
    assert resolved["train"]["steps"] == 3  # flag beats file
    assert resolved["optim"]["lr"] == 0.002  # override beats file
    assert resolved["optim"]["warmup_steps"] == 1 and resolved["train"]["seed"] == 7  # file
    assert resolved["model"]["d_model"] == 32 and resolved["model"]["n_heads"] == 4  # file+preset
    assert_user_error(capsys, "pretrain", "--config", tmp_path / "none.yaml", "--out", out,
                      match="does not exist")


def test_eval_writes_the_machine_readable_figures(capsys: pytest.CaptureFixture,
                                                  tiny_backbone: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_backbone, run)
    code, stdout, err = run_cli(capsys, "eval", run, "--batches", "5", "--batch-size", "4")
    assert code == 0, err
    result = json.loads((run / "eval.json").read_text())
    assert result == json.loads(stdout)
    trained = json.loads((run / "config.json").read_text())
    assert result["block_size"] == trained["data"]["block_size"] == 32  # the trained context
    assert result["tokens_evaluated"] == 5 * 4 * 32
    assert result["perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["bits_per_token"] == pytest.approx(result["val_loss"] / math.log(2))
    assert result["bits_per_char"] == result["bits_per_token"]
    vocab = trained["model"]["vocab_size"]
    assert result["val_loss"] < math.log(vocab)  # 40 steps of training beat a uniform guess


def test_generate_prints_text(capsys: pytest.CaptureFixture, tiny_backbone: Path) -> None:
    argv = ["generate", tiny_backbone, "--prompt", "ROMEO:", "--max-new-tokens", "30",
            "--num-samples", "2", "--seed", "3"]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    samples = stdout.split("\n---\n")
    assert len(samples) == 3 and samples[2] == ""
    for text in samples[:2]:
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30
    assert run_cli(capsys, *argv)[1] == stdout  # the seed fixes the samples


def test_module_entry_point_reports_errors_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "adadepth", "eval", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_route_data_override_keeps_the_backbones_other_data_settings(
        tiny_backbone: Path, tmp_path: Path) -> None:
    """`data.block_size=N` on a route overrides that key alone; the rest is the backbone's."""
    out = tmp_path / "routed"
    assert main(["route", "--backbone", str(tiny_backbone), "--steps", "1", "--out", str(out),
                 "data.block_size=24", "train.eval_batches=1",
                 "routing.calibration_windows=4"]) == 0
    routed = yaml.safe_load((out / "config.yaml").read_text())["data"]
    backbone = json.loads((tiny_backbone / "config.json").read_text())["data"]
    assert routed["block_size"] == 24
    assert {k: v for k, v in routed.items() if k != "block_size"} == {
        k: v for k, v in backbone.items() if k != "block_size"}
