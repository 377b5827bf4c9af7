"""A new method plugs in by registering itself once: `adadepth fit` trains it, its run folder
loads back, and eval, bench, generate and from_pretrained / save_pretrained serve it, with no
change anywhere else. The method here exists only for this test: it runs the first layers of
the backbone and reads them through a trained norm and the shared head."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from causality import assert_round_trip
from pydantic import PositiveInt
from test_cli import assert_user_error
from torch import Tensor, nn

import adadepth
from adadepth import flops as fl
from adadepth.cli import main
from adadepth.config import Strict
from adadepth.depth.dispatch import PLAIN, Call, Tally
from adadepth.depth.method import Evaluate, Knob, Method, MethodSpec
from adadepth.depth.registry import register
from adadepth.model import Output
from adadepth.runs import load_run


class TruncatedConfig(Strict):
    layers: PositiveInt | None = None  # None: all


class Truncated(Method):
    """A test method on the seams: the first `depth` layers and a head of its own."""

    name = "truncated-test"
    knob = Knob("layer_fraction", (1.0, 0.5))
    depth_unit = "layers run"

    def __init__(self, backbone: nn.Module, options: TruncatedConfig) -> None:
        super().__init__(backbone, options)
        self.depth = options.layers or backbone.n_layers
        self.norm = backbone.make_norm()

    def forward(self, idx: Tensor, cache=None, start: int = 0, *,
                positions: Tensor | None = None, call: Call = PLAIN) -> Output:
        depth = self.backbone.n_layers if call.force is True else self.depth
        x, ctx = self.backbone.prepare(idx, cache, start, positions=positions)
        for i in range(depth):
            x = self.backbone.run_layer(i, x, ctx)
        call.count("tokens", idx.numel())
        call.count("layers", idx.numel() * depth)
        call.note_depth(torch.full(idx.shape, depth))
        return Output(self.backbone.unembed(self.norm(x)), x)

    def method_modules(self) -> dict[str, nn.Module]:
        return {"norm": self.norm}

    def knob_setter(self, value: float, calibration: Tensor) -> Callable[[], None]:
        depth = max(1, round(value * self.backbone.n_layers))
        return lambda: setattr(self, "depth", depth)

    def current_setting(self) -> Callable[[], None]:
        depth = self.depth
        return lambda: setattr(self, "depth", depth)

    def reference_flops_per_token(self, context: float) -> float:
        return sum(fl.forward_per_token(self.cfg, context).values())

    def tally_flops(self, tally: Tally, context: float) -> float:
        counted = fl.forward_per_token(self.cfg, 1.0)
        per_layer = (counted["attn_proj"] + counted["ffn"]) / self.cfg.n_layers
        scores = fl.attention(self.cfg, context)["attn_scores"]
        layers = tally.get("layers") / max(tally.tokens, 1)
        return layers * (per_layer + scores) + counted["lm_head"]

    def tally_summary(self, tally: Tally) -> dict[str, Any]:
        return {"layers_run": tally.get("layers") / max(tally.tokens, 1),
                "tokens": int(tally.tokens)}

    def after_training(self, calibration: Tensor, held_out: Tensor,
                       evaluate: Evaluate) -> dict[str, Any]:
        return {"layers_run": self.depth}


register("method", Truncated.name)(MethodSpec(
    name=Truncated.name, config=TruncatedConfig, build=Truncated, kind="truncated-test"))

QUICK = ["train.batch_size=4", "train.eval_batches=2", "train.eval_interval=3",
         "train.ckpt_interval=3", "optim.lr=1e-2", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def fitted(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fit") / "run"
    assert main(["fit", "--method", Truncated.name, "--backbone", str(tiny_backbone),
                 "--steps", "3", "--out", str(out), f"{Truncated.name}.layers=2", *QUICK]) == 0
    return out


def test_fit_trains_only_the_method_and_the_run_loads_back(fitted: Path,
                                                          tiny_backbone: Path) -> None:
    metrics = json.loads((fitted / "metrics.json").read_text())
    assert metrics["method"] == Truncated.name and metrics["steps"] == 3
    assert metrics["layers_run"] == 2 and metrics["trainable_parameters"] == 64  # one norm
    assert metrics["training_flops"] > 0
    model = load_run(fitted).model
    assert isinstance(model, Truncated) and model.depth == 2
    # the norm trained (it started as a copy of the final norm); the backbone did not
    original = load_run(tiny_backbone).model
    assert not torch.equal(model.norm.weight, original.final_norm.weight)
    for a, b in zip(model.backbone.parameters(), original.parameters(), strict=True):
        assert torch.equal(a, b)


def test_eval_bench_and_generate_serve_the_new_method(fitted: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(fitted), "--batches", "2"]) == 0
    assert json.loads((fitted / "eval.json").read_text())["kind"] == "truncated-test"
    assert main(["bench", str(fitted), "--prefill-batch", "2", "--prefill-len", "16",
                 "--decode-batches", "1", "--decode-tokens", "3", "--reps", "1",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    ideal = {(r["phase"], r["setting"]): r["ideal_speedup"] for r in rows}
    assert ideal["prefill", 1.0] == pytest.approx(1.0) and ideal["prefill", 0.5] > 1.3
    capsys.readouterr()
    assert main(["generate", str(fitted), "--prompt", "ROMEO:", "--max-new-tokens", "5"]) == 0
    assert '"layers_run": 2' in capsys.readouterr().err


def test_from_pretrained_and_save_pretrained_serve_the_new_method(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      max_position_embeddings=32)).eval()
    model = adadepth.from_pretrained(hf, method=Truncated.name, layers=2)
    with torch.no_grad():
        model.norm.weight.mul_(1.5)
    loaded = assert_round_trip(model, torch.randint(0, 50, (2, 7)), tmp_path / "saved")
    assert isinstance(loaded, Truncated)


@pytest.mark.parametrize("argv, match", [
    (["fit", "--method", "no-such-method", "--out", "x"], "unknown method"),
    (["route", "--backbone", "no/such/run", "--out", "x"], "does not exist"),
    (["fit", "--method", Truncated.name, "--out", "x", f"{Truncated.name}.colour=1"],
     "unknown key"),
    (["fit", "--method", Truncated.name, "--out", "x", f"{Truncated.name}.layers=0"], "layers"),
])
def test_bad_fit_input(capsys: pytest.CaptureFixture, argv: list[str], match: str) -> None:
    assert_user_error(capsys, *argv, match=match)


def test_fit_from_scratch_trains_the_backbone_too(tmp_path: Path) -> None:
    out = tmp_path / "scratch"
    assert main(["fit", "--method", Truncated.name, "--preset", "tiny", "--steps", "2",
                 "--out", str(out), "model.d_model=32", "model.n_layers=2", "model.d_ff=64",
                 "data.block_size=16", *QUICK]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_parameters"] > 10_000  # the whole model, not one norm
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] is None and config["model"]["d_model"] == 32
    loaded = load_run(out).model
    assert loaded.backbone_trained() and loaded.cfg.n_layers == 2


def test_a_method_with_nothing_to_train_only_calibrates(tiny_backbone: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "calibrated"
    assert main(["fit", "--method", Truncated.name, "--backbone", str(tiny_backbone),
                 "--out", str(out), f"{Truncated.name}.layers=3", *QUICK,
                 "train.eval_batches=1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 0 and metrics["layers_run"] == 3


@pytest.fixture(autouse=True)
def _frozen_norm(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """For the calibration-only test: the method adds nothing trainable."""
    if request.node.name == "test_a_method_with_nothing_to_train_only_calibrates":
        monkeypatch.setattr(Truncated, "method_modules", lambda self: {})
