"""CALM early exit: never exiting is the dense model; exited tokens' states are copied upward so
cached decoding equals recomputation and an independent reference, rows exiting at different
layers; decisions are causal; the FLOPs count is what ran; the threshold calibration is Learn
then Test; and a run trains, evaluates, benches, generates and saves like any method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from causality import assert_causal, assert_round_trip
from test_cache import V, backbone, tokens
from test_cli import assert_user_error
from torch import Tensor

import adadepth
from adadepth.cli import main
from adadepth.depth.calm import CalmConfig, CalmModel, binomial_cdf, hoeffding_bentkus
from adadepth.depth.dispatch import Call, Subset
from adadepth.errors import UserError
from adadepth.generate import generate
from adadepth.runs import load_run

RESIDUAL_OUT = ("o_proj.weight", "down_proj.weight", "c_proj.weight", "attention.dense.weight",
                "mlp.dense_4h_to_h.weight")


def lively(bb):
    """Random blocks barely move the residual stream at initialisation, so every exit would
    agree; larger residual outputs make the layers matter and confidences vary."""
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if name.endswith(RESIDUAL_OUT):
                p.mul_(30)
    return bb


class Planned(CalmModel):
    """CALM with a forced decision pattern: token (row, position) exits after layer
    plan[row, position] (n_layers - 1 = never exits early)."""

    plan: Tensor

    def decide(self, layer: int, conf: Tensor, sub: Subset) -> Tensor:
        rows = sub.rows if sub.rows is not None else torch.arange(conf.shape[0])
        positions = sub.ctx.positions.expand(len(rows), -1)
        return self.plan[rows.unsqueeze(1), positions] == layer


def planned(bb, plan: Tensor, confidence: str = "saturation") -> Planned:
    model = Planned(bb, CalmConfig(threshold=0.5, confidence=confidence)).eval()
    model.plan = plan
    return model


def reference_exits(model: CalmModel, idx: Tensor, exit_at: Tensor) -> Tensor:
    """Logits of tokens exiting after layer exit_at[b, t], computed the plain way: every block
    runs on every token and exited tokens simply keep their state (so their K/V at later layers
    come from the copied state), then each token reads the head of its exit layer."""
    bb = model.backbone
    x, ctx = bb.prepare(idx)
    states = []
    for layer in range(bb.n_layers):
        out = bb.run_layer(layer, x, ctx)
        x = torch.where((exit_at >= layer).unsqueeze(-1), out, x)
        states.append(x)
    logits = torch.stack([model.heads.logits(bb, i, s) for i, s in enumerate(states)])
    index = exit_at.view(1, *exit_at.shape, 1, 1).expand(1, *exit_at.shape, 1, logits.shape[-1])
    return logits.unsqueeze(-2).gather(0, index).squeeze(0).squeeze(-2)


def run(model: CalmModel, idx: Tensor, cache=None, start: int = 0) -> tuple[Tensor, Tensor]:
    """Logits of a forward and the layers each token ran before exiting."""
    depth: list[Tensor] = []
    logits = model(idx, cache, start, call=Call(depth=depth)).logits
    return logits, depth[-1].long()


def close(a: Tensor, b: Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["ours", "llama", "gpt2"])
def test_a_threshold_that_never_exits_is_the_dense_model(name: str) -> None:
    bb = backbone(name)
    model = CalmModel(bb, CalmConfig(threshold=1.0)).eval()
    idx = tokens(2, 9)
    runner, m = model.measured()
    with torch.no_grad():
        got = runner(idx).logits
        assert torch.equal(got, bb(idx).logits)
        assert torch.equal(generate(model, idx[:, :3], 6, temperature=0.0),
                           generate(bb, idx[:, :3], 6, temperature=0.0))
    assert m.flops_per_token(5.0) == pytest.approx(model.reference_flops_per_token(5.0))
    assert m.summary()["layers_per_token"] == bb.n_layers
    # the exit loop itself, measuring confidences that never pass, is the dense model too
    never = planned(bb, torch.full((2, 9), bb.n_layers - 1), confidence="softmax")
    with torch.no_grad():
        torch.testing.assert_close(never(idx).logits, got, atol=1e-6, rtol=1e-6)
        assert torch.equal(generate(never, idx[:, :3], 6, temperature=0.0),
                           generate(bb, idx[:, :3], 6, temperature=0.0))


@pytest.mark.parametrize("name", ["ours", "llama", "gpt2", "gpt_neox", "gemma3"])
def test_cached_generation_with_copied_states_equals_recomputation(name: str) -> None:
    """Rows exit at different layers at every step; the prompt's tokens too, within rows. The
    cached model, the one-call scoring of the whole sequence and the plain reference agree."""
    bb = backbone(name)
    L, B, P, T = bb.n_layers, 3, 4, 10
    plan = torch.randint(0, L, (B, T), generator=torch.Generator().manual_seed(7))
    plan[:, 0], plan[0, 5], plan[1, 5] = 0, 0, L - 1  # some exit at once, some never do
    model = planned(bb, plan)
    idx = tokens(B, T, seed=3)
    with torch.no_grad():
        expected = reference_exits(model, idx, plan)
        scored, depth = run(model, idx)
        close(scored, expected)
        assert torch.equal(depth, plan + 1)
        cache = model.new_cache(B, T)
        steps = [model(idx[:, :P], cache, 0).logits]
        for t in range(P, T):
            logits, depth = run(model, idx[:, t:t + 1], cache, t)
            steps.append(logits)
            assert torch.equal(depth[:, 0], plan[:, t] + 1)
        close(torch.cat(steps, 1), expected)


def test_exits_from_real_confidences_decode_as_they_score() -> None:
    """No forced pattern: saturation decides, and decoding with the cache decides and predicts
    exactly as scoring the generated text in one call does."""
    bb = lively(backbone("ours"))
    model = CalmModel(bb, CalmConfig(threshold=0.7, confidence="saturation")).eval()
    with torch.no_grad():
        out = generate(model, tokens(3, 4), 12, temperature=0.0)
        cache = model.new_cache(3, 16)
        steps = [run(model, out[:, :4], cache, 0)]
        for t in range(4, 16):
            steps.append(run(model, out[:, t:t + 1], cache, t))
        scored, scored_depth = run(model, out)
    depths = torch.cat([d for _, d in steps], 1)
    assert len(depths.unique()) >= 3  # tokens exit at several layers
    assert torch.equal(depths, scored_depth)
    close(torch.cat([logits for logits, _ in steps], 1), scored)


@pytest.mark.parametrize("confidence, threshold",
                         [("saturation", 0.5), ("softmax", 0.1), ("classifier", 0.5)])
def test_exit_decisions_are_causal(confidence: str, threshold: float) -> None:
    bb = lively(backbone("ours"))
    torch.manual_seed(0)  # the classifier's initialisation
    model = CalmModel(bb, CalmConfig(threshold=threshold, confidence=confidence)).eval()
    with torch.no_grad():
        for norm in model.heads.norms:  # sharper exit distributions: softmax gaps vary
            norm.weight.mul_(8)
    idx = tokens(3, 12, seed=11)

    def depths(x: Tensor) -> Tensor:
        with torch.no_grad():
            return run(model, x)[1]

    base = depths(idx)
    assert len(base.unique()) >= 2  # a mix of exits, or the check would be empty
    changed = assert_causal(depths, idx, V, cuts=[3, 6, 9])
    assert any(not torch.equal(c, base) for c in changed)  # later decisions did move


def test_the_causality_check_catches_a_decision_that_looks_ahead() -> None:
    def lookahead(x: Tensor) -> Tensor:  # top half of each sequence: sees the whole row
        return x >= x.float().median(1, keepdim=True).values

    with pytest.raises(AssertionError, match="depend on later tokens"):
        assert_causal(lookahead, tokens(4, 12), V)


def test_flops_count_what_ran() -> None:
    """A forced pattern, counted by hand: blocks run, K/V of copied states, head reads."""
    bb = backbone("ours")
    L, B, P, T = bb.n_layers, 2, 3, 8
    plan = torch.randint(0, L, (B, T), generator=torch.Generator().manual_seed(2))
    model = planned(bb, plan, confidence="softmax")
    costs, idx = model.costs, tokens(B, T)
    cache = model.new_cache(B, T)
    runner, m = model.measured()
    with torch.no_grad():
        model(idx[:, :P], cache, 0)
        for t in range(P, T):
            runner(idx[:, t:t + 1], cache, t)
    exits = plan[:, P:].flatten().tolist()
    context = 4.0
    scores = 2 * 2.0 * context * bb.cfg.n_heads * bb.cfg.head_dim
    # decoding: token exiting after layer e runs e+1 blocks and reads the head after each
    # (softmax), and each later block writes its K/V from the copied state
    by_hand = sum((e + 1) * (costs.layer + scores) + (e + 1) * costs.head
                  + (L - 1 - e) * costs.kv for e in exits) / len(exits)
    assert m.flops_per_token(context) == pytest.approx(by_hand)
    assert m.summary()["layers_per_token"] == pytest.approx(sum(e + 1 for e in exits) / len(exits))
    # scoring one row: a copied state's K/V are computed only up to the last layer some later
    # token still runs
    row = model.plan = plan[:1]
    runner, m = model.measured()
    with torch.no_grad():
        runner(idx[:1])
    exits = row[0].tolist()
    kv = sum(1 for i in range(1, L) for t, e in enumerate(exits)
             if e < i and any(later >= i for later in exits[t + 1:]))
    by_hand = (sum((e + 1) * (costs.layer + scores + costs.head) for e in exits)
               + kv * costs.kv) / T
    assert m.flops_per_token(context) == pytest.approx(by_hand)


# -- calibration ----------------------------------------------------------------------------
def test_hoeffding_bentkus_p_values() -> None:
    assert binomial_cdf(3, 10, 0.2) == pytest.approx(0.8791261, rel=1e-6)  # a table value
    assert binomial_cdf(10, 10, 0.2) == 1.0
    # no disagreement in many examples: the risk is surely below 0.1; at the bound: no evidence
    assert hoeffding_bentkus(0.0, 200, 0.1) < 1e-6
    assert hoeffding_bentkus(0.1, 200, 0.1) > 0.5
    assert hoeffding_bentkus(0.02, 200, 0.1) < hoeffding_bentkus(0.05, 200, 0.1)
    assert hoeffding_bentkus(0.02, 400, 0.1) < hoeffding_bentkus(0.02, 100, 0.1)


def test_calibration_is_fixed_sequence_testing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thresholds are tested from 1 down and testing stops at the first one not certified."""
    model = CalmModel(backbone("ours"), CalmConfig(calibration_step=0.1, agreement=0.9,
                                                   calibration_windows=200)).eval()
    risk_at = {0.9: 0.0, 0.8: 0.01, 0.7: 0.03, 0.6: 0.09, 0.5: 0.0}  # 0.5 is never reached

    def disagreement(windows: Tensor, reference: Tensor) -> Tensor:
        risk = risk_at.get(round(float(model.threshold), 6), 0.5)
        return torch.full((len(windows),), risk)

    monkeypatch.setattr(model, "consistency_outputs", lambda w, m=None: None)
    monkeypatch.setattr(model, "disagreement", disagreement)
    report = model.calibrate(torch.zeros(200, 8, dtype=torch.long))
    tested = [t["threshold"] for t in report["thresholds_tested"]]
    assert tested == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert report["threshold"] == pytest.approx(0.7) and float(model.threshold) == 0.7
    assert report["threshold_certified"]
    for t in report["thresholds_tested"][:3]:
        assert t["p_value"] <= 0.05
    assert report["thresholds_tested"][3]["p_value"] > 0.05


def test_an_uncalibrated_model_says_so() -> None:
    model = CalmModel(backbone("ours"), CalmConfig()).eval()
    with pytest.raises(UserError, match="threshold"):
        model(tokens(1, 4))


# -- a run, end to end ------------------------------------------------------------------------
QUICK = ["train.batch_size=4", "train.eval_batches=2", "train.eval_interval=2",
         "train.ckpt_interval=2", "optim.warmup_steps=0", "calm.calibration_windows=8",
         "calm.calibration_tokens=6", "calm.calibration_step=0.25"]


@pytest.fixture(scope="module")
def calm_run(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calm") / "run"
    assert main(["fit", "--method", "calm", "--backbone", str(tiny_backbone), "--steps", "2",
                 "--out", str(out), *QUICK]) == 0
    return out


def test_fit_calibrates_and_the_run_serves_eval_bench_generate(
        calm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics = json.loads((calm_run / "metrics.json").read_text())
    assert 0 <= metrics["threshold"] <= 1 and metrics["thresholds_tested"]
    assert metrics["calibration_consistency"] == "generated"
    model = load_run(calm_run).model
    assert isinstance(model, CalmModel) and float(model.threshold) == metrics["threshold"]
    assert model.backbone_trained()  # the paper's regime: the backbone learns to exit
    assert main(["eval", str(calm_run), "--batches", "2"]) == 0
    report = json.loads((calm_run / "eval.json").read_text())
    assert 1 <= report["layers_per_token"] <= 4
    assert sum(report["exit_fraction_per_layer"]) == pytest.approx(1.0)
    assert main(["bench", str(calm_run), "--settings", "1.0,0.3", "--prefill-batch", "2",
                 "--prefill-len", "16", "--decode-batches", "1,2", "--decode-tokens", "4",
                 "--reps", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {(r["phase"], r["batch"], r["setting"]) for r in rows} == {
        (p, b, s) for p, b in (("prefill", 2), ("decode", 1), ("decode", 2)) for s in (1.0, 0.3)}
    for r in rows:
        if r["setting"] == 1.0:  # never exits, no confidence measured: exactly dense
            assert r["ideal_speedup"] == pytest.approx(1.0)
            assert r["realised"]["layers_per_token"] == 4
    capsys.readouterr()
    assert main(["generate", str(calm_run), "--prompt", "ROMEO:", "--max-new-tokens", "5"]) == 0
    assert '"layers_per_token"' in capsys.readouterr().err
    assert_harness_scores_the_deployed_model(calm_run, model)


def assert_harness_scores_the_deployed_model(run: Path, model) -> None:
    """lm-eval's adapter scores with the method as deployed (here: exits and all)."""
    from lm_eval.api.instance import Instance

    from adadepth.hf.harness import AdadepthLM

    lm = AdadepthLM(run=str(run), batch_size=2)
    tok = lm.tok
    ctx, whole = tok.encode("ROMEO:"), tok.encode("ROMEO: good")
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0, len(ctx) - 1:-1].log_softmax(-1)
    expected = logp.gather(-1, torch.tensor(whole[len(ctx):])[:, None]).sum().item()
    (score, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("ROMEO: ", "good"), 0)])
    assert score == pytest.approx(expected, abs=1e-4)
    text, = lm.generate_until([Instance("generate_until", {},
                                        ("ROMEO:", {"until": [], "max_gen_toks": 5}), 0)])
    with torch.no_grad():
        out = generate(model, torch.tensor([ctx]), 5, temperature=0.0)
    assert text == tok.decode(out[0, len(ctx):].tolist())


def test_from_pretrained_and_save_pretrained(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      max_position_embeddings=32)).eval()
    model = adadepth.from_pretrained(hf, method="calm", threshold=0.2, regime="heads")
    with torch.no_grad():
        model.heads.norms[0].weight.mul_(1.5)
    loaded = assert_round_trip(model, torch.randint(0, 50, (2, 7)), tmp_path / "saved")
    assert isinstance(loaded, CalmModel)


@pytest.mark.parametrize("argv, match", [
    (["fit", "--method", "calm", "--out", "x", "calm.threshold=1.5"], "threshold"),
    (["fit", "--method", "calm", "--out", "x", "calm.threshold=-0.1"], "threshold"),
    (["fit", "--method", "calm", "--out", "x", "calm.confidence=entropy"], "confidence"),
])
def test_bad_input(capsys: pytest.CaptureFixture, argv: list[str], match: str) -> None:
    assert_user_error(capsys, *argv, match=match)


def test_a_backbone_it_cannot_wrap(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert_user_error(capsys, "fit", "--method", "calm", "--preset", "tiny", "--out",
                      tmp_path / "one", "model.n_layers=1", match="at least 2 layers")
    with pytest.raises(UserError, match="layer-stack interface"):
        CalmModel(torch.nn.Linear(4, 4), CalmConfig())
