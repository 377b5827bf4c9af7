"""DDP and FSDP under torchrun (2 CPU processes, gloo) against one plain process.

The global batch (train.batch_size) is split across the ranks, each rank slicing the same random
draw, so a 2-process run takes the same gradient as one process: losses must agree to float
rounding. The learning rate is held constant so that a run may stop at one step and be resumed
at another without the schedule changing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import corpus_file
from safetensors.torch import load_file

from adadepth.cli import main
from adadepth.depth.routing import RoutedModel, RoutingConfig
from adadepth.errors import UserError
from adadepth.model import Transformer
from adadepth.train import checkpoint as ck
from adadepth.train.parallel import (
    checkpoint_activations,
    dcp_folder,
    dcp_to_safetensors,
    find_blocks,
    shared_units,
)

TOL = 1e-5
COMMON = ["train.batch_size=4", "train.eval_interval=5", "train.ckpt_interval=5",
          "train.eval_batches=3", "train.log_interval=1", "optim.warmup_steps=0"]
PRETRAIN = ["--preset", "tiny", "--tokenizer", "char", "model.d_model=32", "model.n_layers=3",
            "model.n_heads=2", "model.d_ff=64", "data.block_size=32", "optim.min_lr=1e-3",
            *COMMON]
ROUTE = ["optim.min_lr=2e-3", *COMMON]


def torchrun(*args: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "adadepth", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # every rank prints the same line


def one_process(*args: str) -> None:
    assert main(list(args)) == 0


def logged(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def assert_same_losses(run: Path, reference: Path, steps: range, key: str = "loss") -> None:
    got, ref = logged(run), logged(reference)
    for step in steps:
        assert abs(got[step][key] - ref[step][key]) <= TOL, (step, got[step][key], ref[step][key])
        if "val_loss" in ref[step]:
            assert abs(got[step]["val_loss"] - ref[step]["val_loss"]) <= TOL, step


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return corpus_file(tmp_path_factory, 200_000)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """The reference: one plain process (no torchrun, no process group), 7 steps."""
    out = tmp_path_factory.mktemp("single")
    one_process("pretrain", "--corpus", str(corpus), "--steps", "7", "--out", str(out), *PRETRAIN)
    return out


def test_ddp_matches_one_process(tmp_path: Path, corpus: Path, single: Path) -> None:
    out = tmp_path / "ddp"
    result = torchrun("pretrain", "--corpus", str(corpus), "--steps", "5", "--out", str(out),
                      "--parallel", "ddp", *PRETRAIN)
    assert result["steps"] == 5
    assert_same_losses(out, single, range(1, 6))
    plan = json.loads((out / "parallel.json").read_text())
    assert (plan["mode"], plan["world_size"], plan["batch_per_rank"]) == ("ddp", 2, 2)
    row, ref = logged(out)[5], logged(single)[5]
    assert len(row["tokens_per_s_rank"]) == 2 and row["tokens_per_s"] > 0
    # The FLOPs all ranks executed per global token equal one process's: each rank did its half
    # (equal losses alone would not show it: two ranks on the whole batch average the same).
    per_token = row["flops_per_s"] / row["tokens_per_s"]
    assert per_token == pytest.approx(ref["flops_per_s"] / ref["tokens_per_s"], rel=1e-9)
    # Optimizer and weights in a DCP folder beside the single-file checkpoint.
    assert dcp_folder(ck.latest_checkpoint(out)) is not None


def test_fsdp_matches_one_process_and_resumes_in_one(tmp_path: Path, corpus: Path,
                                                    single: Path) -> None:
    out = tmp_path / "fsdp"
    args = ["pretrain", "--corpus", str(corpus), "--out", str(out), *PRETRAIN]
    torchrun(*args[:-len(PRETRAIN)], "--steps", "5", "--parallel", "fsdp", *PRETRAIN,
             "train.activation_checkpointing=true")
    assert_same_losses(out, single, range(1, 6))
    assert json.loads((out / "parallel.json").read_text())["fsdp"]["units"] == 4  # 3 + root

    # The consolidated file is the sharded weights gathered: the converter agrees with it, and
    # a loader that knows nothing of FSDP reproduces the logged validation loss.
    ckpt = ck.latest_checkpoint(out)
    consolidated = load_file(str(ckpt / ck.WEIGHTS))
    converted = load_file(str(dcp_to_safetensors(dcp_folder(ckpt), tmp_path / "c.safetensors")))
    assert consolidated.keys() <= converted.keys()
    for name, tensor in consolidated.items():
        assert torch.equal(tensor, converted[name]), name

    # A 2-process sharded checkpoint, resumed by one plain process.
    one_process(args[0], "--steps", "7", "--resume", *args[1:])
    assert_same_losses(out, single, range(6, 8))
    assert not list(out.glob("dcp-*")), "the outdated sharded checkpoint is removed"


def controller_tensors(backbone: Path) -> tuple[int, int]:
    from adadepth.runs import load_run

    model = RoutedModel(load_run(backbone).model, RoutingConfig())
    params = model.controller_parameters()
    return len(params), sum(p.numel() for p in params)


@pytest.fixture(scope="module")
def routed_single(tmp_path_factory: pytest.TempPathFactory, tiny_backbone: Path) -> Path:
    out = tmp_path_factory.mktemp("routed-single")
    one_process("route", "--backbone", str(tiny_backbone), "--steps", "7", "--aux", "none",
                "--out", str(out), *ROUTE)
    return out


def test_controller_only_ddp_reduces_only_the_controller(tmp_path: Path, tiny_backbone: Path,
                                                          routed_single: Path) -> None:
    out = tmp_path / "ddp"
    torchrun("route", "--backbone", str(tiny_backbone), "--steps", "5", "--aux", "none",
             "--parallel", "ddp", "--out", str(out), *ROUTE)
    assert_same_losses(out, routed_single, range(1, 6), key="lm_loss")
    plan = json.loads((out / "parallel.json").read_text())
    tensors, numel = controller_tensors(tiny_backbone)
    assert plan["frozen_parameters"] > 0
    assert plan["ddp_reducer"]["num_parameter_tensors"] == tensors
    assert plan["ddp_reducer"]["total_parameter_size_bytes"] == 4 * numel  # fp32, frozen absent
    assert sum(map(int, plan["ddp_reducer"]["bucket_sizes"].split(", "))) == 4 * numel


def test_controller_only_fsdp_with_oracle_labels(tmp_path: Path, tiny_backbone: Path,
                                                 routed_single: Path) -> None:
    """The oracle's counterfactual forwards re-enter sharded blocks under no_grad. Its util and
    rank losses use batch statistics (standardisation, mean over valid pairs) that per-rank
    slices change, so they get weight 0 here: the gradient is then the LM's alone and must match
    the aux-free single-process run exactly, also after one plain process resumes the sharded
    checkpoint (which holds the controller, not the frozen backbone) and calibrates."""
    out = tmp_path / "fsdp"
    args = ["route", "--backbone", str(tiny_backbone), "--aux", "util,rank", "--out", str(out)]
    overrides = [*ROUTE, "routing.lambda_util=0", "routing.lambda_rank=0"]
    torchrun(*args, "--steps", "5", "--parallel", "fsdp", *overrides)
    assert_same_losses(out, routed_single, range(1, 6), key="lm_loss")
    assert "util_loss" in logged(out)[1]
    one_process(*args, "--steps", "7", "--resume", *overrides)
    assert_same_losses(out, routed_single, range(6, 8), key="lm_loss")
    metrics = json.loads((out / "metrics.json").read_text())
    reference = json.loads((routed_single / "metrics.json").read_text())
    assert abs(metrics["val_lm_causal"] - reference["val_lm_causal"]) <= TOL


# ---------------------------------------------------------------- the pieces, in one process

def tiny_routed() -> RoutedModel:
    from adadepth.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=17, d_model=16, n_layers=4, n_heads=2, d_ff=32, max_seq_len=16)
    return RoutedModel(Transformer(cfg), RoutingConfig())


def test_blocks_and_routers_reached_from_outside_are_found() -> None:
    model = tiny_routed()
    assert find_blocks(model) == list(model.backbone.blocks)
    # The routed FFNs sit in blocks 1 and 2 and in model.routers: their own FSDP units.
    assert shared_units(model, find_blocks(model)) == list(model.routers)
    with pytest.raises(UserError, match="layer stack"):
        find_blocks(torch.nn.Linear(2, 2))


def test_activation_checkpointing_keeps_gradients_and_undoes() -> None:
    routed = tiny_routed()
    model = routed.backbone  # its blocks hold the routed FFNs
    idx = torch.randint(0, 17, (2, 8))

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        routed(idx).logits.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    undo = checkpoint_activations(model)
    recomputed = grads()
    undo()
    assert all("forward" not in vars(b) for b in model.blocks)
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(a, b)


def test_ddp_with_a_constant_gate_whose_cheap_path_sits_out(tmp_path: Path,
                                                            tiny_backbone: Path) -> None:
    """The static gate runs one controlled layer all-full: its cheap FFN gets no gradient.
    DDP must be told to expect unused parameters, or the second step fails."""
    out = tmp_path / "static"
    result = torchrun("route", "--backbone", str(tiny_backbone), "--gate", "static", "--aux",
                      "none", "--steps", "3", "--parallel", "ddp", "--out", str(out), *ROUTE)
    assert result["full_fraction_causal"] == [1.0, 0.0]
