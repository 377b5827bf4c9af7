"""Configs, checkpoints that survive a kill, and resume after a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adadepth.config import (
    ModelConfig,
    PretrainConfig,
    TrainConfig,
    apply_overrides,
    load_yaml,
    preset,
    validate,
)
from adadepth.errors import UserError
from adadepth.model import Transformer
from adadepth.train import checkpoint as ck
from adadepth.train import parallel

# ---------------------------------------------------------------- config


def test_overrides_set_nested_keys_with_yaml_typed_values() -> None:
    data = apply_overrides({"optim": {"lr": 1.0}}, [
        "optim.lr=3e-4", "train.steps=5", "model.tie_embeddings=false", "data.max_docs=null",
        "data.corpus=some/file.txt",
    ])
    cfg = validate(PretrainConfig, data)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 5 and isinstance(cfg.train.steps, int)
    assert cfg.model.tie_embeddings is False
    assert cfg.data.max_docs is None
    assert cfg.data.corpus == "some/file.txt"


@pytest.mark.parametrize("override, message", [
    ("model.foo=1", "model.foo: unknown key"),
    ("bogus=1", "bogus: unknown key"),
    ("model.d_model=0", "model.d_model"),
    ("model.d_model=wide", "model.d_model"),
    ("data.block_size=-1", "data.block_size"),
    ("optim.beta2=1.5", "optim.beta2"),
    ("train.parallel=mpi", "train.parallel"),
])
def test_bad_config_values_are_one_line_user_errors(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        validate(PretrainConfig, apply_overrides({}, [override]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["no_equals_sign", "train.steps.deeper=1"])
def test_malformed_overrides_are_user_errors(override: str) -> None:
    with pytest.raises(UserError):
        apply_overrides({"train": {"steps": 3}}, [override])


def test_yaml_file_loads_and_bad_files_are_user_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  d_model: 64\noptim:\n  lr: 0.01\n")
    cfg = validate(PretrainConfig, load_yaml(good))
    assert cfg.model.d_model == 64 and cfg.optim.lr == 0.01
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    for name, message in [("list.yaml", "mapping"), ("broken.yaml", "not valid YAML"),
                          ("missing.yaml", "does not exist")]:
        with pytest.raises(UserError, match=message):
            load_yaml(tmp_path / name)


def test_presets_have_their_documented_sizes() -> None:
    def non_embedding(name: str) -> int:
        model = Transformer(preset(name).model_copy(update={"vocab_size": 1}))
        return sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n)

    assert 0.7e6 < non_embedding("tiny") < 1.0e6
    assert 8e6 < non_embedding("small") < 12e6
    with pytest.raises(UserError, match="unknown preset"):
        preset("huge")


def test_heads_must_divide_the_width() -> None:
    with pytest.raises(UserError, match="heads"):
        ModelConfig(d_model=30, n_heads=4).check()


# ---------------------------------------------------------------- checkpoints


def tiny_model(seed: int, tie: bool = True) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=20, d_model=16, n_layers=2, n_heads=2, d_ff=24, max_seq_len=16,
                      tie_embeddings=tie)
    return Transformer(cfg)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_round_trip(tmp_path: Path, tie: bool) -> None:
    model, fresh = tiny_model(0, tie), tiny_model(1, tie)
    path = ck.save_checkpoint(tmp_path, 7, ck.unique_state(model), {"step": 7, "note": "x"})
    assert path.name == "ckpt-0000007"
    assert ck.require_checkpoint(tmp_path) == path
    ck.load_weights(fresh, path)
    assert_same_weights(fresh, model)
    assert (fresh.lm_head.weight is fresh.tok_embeddings.weight) is tie
    assert ck.load_train_state(path) == {"step": 7, "note": "x"}


def test_weights_of_another_shape_are_a_user_error(tmp_path: Path) -> None:
    path = ck.save_checkpoint(tmp_path, 1, ck.unique_state(tiny_model(0)))
    torch.manual_seed(0)
    other = Transformer(ModelConfig(vocab_size=20, d_model=32, n_layers=2, n_heads=2, d_ff=24))
    with pytest.raises(UserError, match="different model shape"):
        ck.load_weights(other, path)
    deeper = Transformer(ModelConfig(vocab_size=20, d_model=16, n_layers=3, n_heads=2, d_ff=24))
    with pytest.raises(UserError, match="does not fit"):
        ck.load_weights(deeper, path)


def test_old_checkpoints_are_pruned(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, step, ck.unique_state(tiny_model(step)), keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0000002", "ckpt-0000003"]


def test_kill_while_writing_weights_keeps_the_last_good_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = tiny_model(0)
    ck.save_checkpoint(tmp_path, 1, ck.unique_state(good))

    def die_half_way(tensors, filename, metadata=None) -> None:
        Path(filename).write_bytes(b"half a safetensors file")
        raise KeyboardInterrupt  # stands in for the kill

    monkeypatch.setattr(ck, "save_file", die_half_way)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, ck.unique_state(tiny_model(1)))
    assert list(tmp_path.glob(".tmp-ckpt-*")), "the interrupted write leaves its temp folder"
    assert ck.require_checkpoint(tmp_path).name == "ckpt-0000001"
    loaded = tiny_model(5)
    ck.load_weights(loaded, ck.require_checkpoint(tmp_path))
    assert_same_weights(loaded, good)
    monkeypatch.undo()
    ck.save_checkpoint(tmp_path, 3, ck.unique_state(good))
    assert not list(tmp_path.glob(".tmp-ckpt-*")), "the next good save clears leftovers"


def test_kill_before_the_pointer_is_written(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # The first checkpoint of a run is in place but LATEST was never written.
    model = tiny_model(0)

    def die(path, text) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "write_text_atomic", die)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 4, ck.unique_state(model))
    assert not (tmp_path / ck.LATEST).exists()
    loaded = tiny_model(5)
    ck.load_weights(loaded, ck.require_checkpoint(tmp_path))
    assert_same_weights(loaded, model)


def test_pointer_to_a_vanished_folder_falls_back(tmp_path: Path) -> None:
    ck.save_checkpoint(tmp_path, 1, ck.unique_state(tiny_model(0)))
    (tmp_path / ck.LATEST).write_text("ckpt-0000099\n")
    assert ck.require_checkpoint(tmp_path).name == "ckpt-0000001"


def test_no_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        ck.require_checkpoint(tmp_path / "nowhere")
    (tmp_path / ".tmp-ckpt-abc").mkdir()
    with pytest.raises(UserError, match="no finished checkpoint"):
        ck.require_checkpoint(tmp_path)


# ---------------------------------------------------------------- resume after SIGKILL

STEPS = 150
RUN_ARGS = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
            "data.block_size=32", "train.batch_size=4", "train.ckpt_interval=10",
            "train.eval_interval=100", "train.eval_batches=4", "train.log_interval=10",
            "train.threads=1", "optim.warmup_steps=20"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slice of tiny-shakespeare as a local file: each subprocess reads it in no time."""
    from adadepth.data.corpora import tiny_shakespeare_text

    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(tiny_shakespeare_text()[:200_000])
    return path


def pretrain_cmd(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "adadepth", "pretrain", "--preset", "tiny", "--corpus",
            str(corpus), "--tokenizer", "char", "--steps", str(STEPS), "--out", str(out),
            *RUN_ARGS, *extra]


def checkpoint_step(run: Path) -> int:
    path = ck.latest_checkpoint(run) if run.is_dir() else None
    return int(path.name.split("-")[1]) if path else 0


def final_result(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    return json.loads(stdout.strip().splitlines()[-1])


def logged(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), "a resumed run must not log a step twice"
    return {r["step"]: r for r in rows}


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path: Path,
                                                           corpus_file: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    popen = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    whole = subprocess.Popen(pretrain_cmd(corpus_file, tmp_path / "whole"), **popen)
    killed_run = tmp_path / "killed"
    victim = subprocess.Popen(pretrain_cmd(corpus_file, killed_run), **popen)
    try:
        deadline = time.monotonic() + 120
        while checkpoint_step(killed_run) < 20 and victim.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        assert victim.poll() is None, "the run finished before it could be killed"
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()
    killed_at = checkpoint_step(killed_run)
    assert 20 <= killed_at < STEPS
    resume = pretrain_cmd(corpus_file, killed_run, "--resume")
    resumed = final_result(subprocess.Popen(resume, **popen))
    reference = final_result(whole)
    assert resumed["steps"] == reference["steps"] == STEPS
    assert abs(resumed["val_loss"] - reference["val_loss"]) <= 1e-6
    a, b = logged(killed_run), logged(tmp_path / "whole")
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6, step
    assert {"step", "loss", "tokens_per_s"} <= a[STEPS].keys()


def test_compiled_training_matches_eager_and_keeps_the_checkpoint_names(
        tmp_path: Path, corpus_file: Path) -> None:
    """`train.compile=true` must run the same training (inductor only reorders float sums),
    and save weights under the model's own names (no `_orig_mod.` prefix)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    popen = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    runs = {name: tmp_path / name for name in ("eager", "compiled")}
    procs = {name: subprocess.Popen(pretrain_cmd(corpus_file, run, *(
        ["train.compile=true"] if name == "compiled" else [])), **popen)
        for name, run in runs.items()}
    results = {name: final_result(proc) for name, proc in procs.items()}
    assert abs(results["compiled"]["val_loss"] - results["eager"]["val_loss"]) < 1e-3
    eager, compiled = logged(runs["eager"]), logged(runs["compiled"])
    assert eager.keys() == compiled.keys()
    for step in eager:
        assert abs(eager[step]["loss"] - compiled[step]["loss"]) < 1e-3, step
    names = [set(ck.load_file(str(ck.latest_checkpoint(run) / ck.WEIGHTS)))
             for run in runs.values()]
    assert names[0] == names[1]


def test_train_compile_compiles_the_step_and_finish_undoes_it(tmp_path: Path) -> None:
    model = Transformer(preset("tiny"))
    par = parallel.setup(model, TrainConfig(compile=True), torch.device("cpu"), tmp_path)
    assert par.model is model and model._compiled_call_impl is not None
    par.finish()
    assert model._compiled_call_impl is None
    plain = parallel.setup(model, TrainConfig(), torch.device("cpu"), tmp_path)
    assert plain.model._compiled_call_impl is None
