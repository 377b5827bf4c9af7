"""AdaPonderLM (method `ponder`): the looped model against hand-written references, halting and
KV reuse under cached decoding, the sparse path against the dense masked one, costs, staging,
saving, the command and its bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from causality import assert_round_trip
from test_cli import assert_user_error
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from adadepth import flops as fl
from adadepth.cli import main
from adadepth.config import ModelConfig
from adadepth.data import build_tokenizer
from adadepth.depth.dispatch import Call
from adadepth.depth.ponder import (
    PonderConfig,
    PonderModel,
    bottom_k_mean,
    schedule_fractions,
    token_uniform,
)
from adadepth.generate import generate
from adadepth.hf.adapters import HFAdapter
from adadepth.model import Transformer
from adadepth.runs import load_run

V = 40


def backbone(name: str = "ours", seed: int = 0):
    torch.manual_seed(seed)
    if name == "ours":
        return Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                                       n_kv_heads=2, d_ff=48, max_seq_len=64)).eval()
    shape = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64)
    if name == "llama":
        hf = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **shape))
    else:
        hf = GPTNeoXForCausalLM(GPTNeoXConfig(**shape))
    return HFAdapter(hf.eval()).eval()


def ponder(bb, seed: int = 1, sharp: float = 30.0, **options) -> PonderModel:
    """A ponder model whose gates are random and sharp, so that with tau = 0.5 tokens halt
    after different passes."""
    torch.manual_seed(seed)
    model = PonderModel(bb, PonderConfig(**{"tau": 0.5, "gate_bias": 0.0, **options}))
    with torch.no_grad():
        for gate in model.gates:
            gate[-1].weight.mul_(sharp)
    return model.eval()


def tokens(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def reference_ponderlm(bb, idx: torch.Tensor, passes: int) -> torch.Tensor:
    """PonderLM written out: every token runs every pass; between passes its input gains the
    probability-weighted input embeddings of its prediction, E <- E + softmax(logits) W_emb."""
    embeds = bb.embed(idx)
    for i in range(passes):
        x, ctx = bb.prepare(embeds=embeds)
        for layer in range(bb.n_layers):
            x = bb.run_layer(layer, x, ctx)
        logits = bb.head(x)
        if i + 1 < passes:
            embeds = embeds + bb.embed_soft(logits.float().softmax(-1))
    return logits


def recorded(model: PonderModel, idx: torch.Tensor, cache=None, start: int = 0, **call):
    """A forward's output and its record (passes per token, gate values)."""
    records: dict = {}
    out = model(idx, cache, start, call=Call(records=records, **call))
    return out, records["ponder"]


def varied(model: PonderModel, idx: torch.Tensor) -> torch.Tensor:
    """The passes of a forward, checked to differ between tokens and rows (else the tests that
    use it could not fail for the right reason)."""
    with torch.no_grad():
        passes = recorded(model, idx)[1].passes
    assert len(set(passes.flatten().tolist())) >= 3, passes
    assert not all(torch.equal(passes[0], row) for row in passes[1:]), passes
    return passes


# -- the model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ours", "llama"])
def test_one_pass_is_the_backbone_and_open_gates_are_ponderlm(name: str) -> None:
    bb = backbone(name)
    idx = tokens(2, 10)
    with torch.no_grad():
        assert torch.equal(PonderModel(bb, PonderConfig(passes=1))(idx).logits, bb(idx).logits)
        expected = reference_ponderlm(bb, idx, 3)
        fixed = PonderModel(bb, PonderConfig(passes=3, halting="none"))
        close(fixed(idx).logits, expected, 1e-6)
        gated = ponder(bb, passes=3)
        close(gated.dense_reference()(idx).logits, expected, 1e-6)  # every gate forced open
        for gate in gated.gates:  # gates that output exactly 1 pass the embedding unscaled
            gate[-1].bias.fill_(100.0)
        out, record = recorded(gated, idx)
        close(out.logits, expected, 1e-6)
        assert bool((record.passes == 3).all())


def test_halting_is_monotonic_and_follows_the_gates() -> None:
    """A halted token stays halted, even when a later gate would let it go on; a token goes on
    exactly when its gate is at least tau."""
    model = ponder(backbone(), passes=4)
    idx = tokens(2, 9)
    with torch.no_grad():
        for closed, expected in ((0, 1), (1, 2)):
            for j, gate in enumerate(model.gates):
                gate[-1].bias.fill_(-100.0 if j == closed else 100.0)
            assert bool((recorded(model, idx)[1].passes == expected).all())
        model = ponder(backbone(), passes=4)
        passes = varied(model, idx)
        first = recorded(model, idx)[1].gates[0].view(2, 9)  # pass 0 runs every token, in order
        assert torch.equal(passes > 1, first >= model.tau)


@pytest.mark.parametrize("name", ["ours", "gpt_neox"])
def test_sparse_path_equals_the_masked_reference_forward_and_backward(name: str) -> None:
    bb = backbone(name)
    idx, y = tokens(3, 12), tokens(3, 12, seed=5)
    sparse = ponder(bb, passes=4)
    varied(sparse, idx)
    dense = ponder(bb, passes=4, dispatch="masked")
    dense.load_state_dict(sparse.state_dict())
    grads = []
    for model in (sparse, dense):
        model.set_trainable(from_scratch=True)
        model.zero_grad()
        loss = model.training_loss(idx, y, step=10**6).loss  # CE + bottom-k, k fully warmed up
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    with torch.no_grad():
        (sparse_out, sparse_record), (dense_out, dense_record) = (recorded(sparse, idx),
                                                                  recorded(dense, idx))
        close(sparse_out.logits, dense_out.logits)
        assert torch.equal(sparse_record.passes, dense_record.passes)
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("gates") for k in grads[0])
    for key in grads[0]:
        close(grads[0][key], grads[1][key])


@pytest.mark.parametrize("name, halting", [("ours", "learned"), ("llama", "learned"),
                                           ("gpt_neox", "learned"), ("ours", "uniform")])
def test_cached_decoding_equals_recomputation(name: str, halting: str) -> None:
    """Rows of one batch whose tokens halt at different passes: a prefill and then one token
    per cached forward give the logits of the whole sequence at once, token by token (halted
    tokens' K/V are carried into later passes' sets), and greedy generation agrees with
    generation that recomputes the prefix every step."""
    bb = backbone(name)
    options = {"halting": halting, "schedule_passes": 2.2} if halting == "uniform" else {}
    model = ponder(bb, passes=4, **options)
    idx = tokens(3, 14)
    passes = varied(model, idx)
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_cache(3, 14)
        depth: list = []
        parts = [model(idx[:, :5], cache, 0, call=Call(depth=depth)).logits]
        for t in range(5, 14):
            parts.append(model(idx[:, t:t + 1], cache, t, call=Call(depth=depth)).logits)
        close(torch.cat(parts, 1), full)
        assert torch.equal(torch.cat(depth, 1), passes.float())
        cached = generate(model, idx[:, :4], 8, temperature=0.0)
        recomputed = generate(model, idx[:, :4], 8, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_a_halted_tokens_state_stops_changing() -> None:
    """A token that halts after pass j leaves with exactly what the same model cut to j+1
    passes gives it: later passes of other tokens do not touch it."""
    bb = backbone()
    model = ponder(bb, passes=4)
    idx = tokens(2, 12)
    passes = varied(model, idx)
    with torch.no_grad():
        out = model(idx)
        for j in sorted({p - 1 for p in passes.flatten().tolist() if p < 4}):
            cut = ponder(bb, passes=j + 1)
            for gate, source in zip(cut.gates, model.gates, strict=False):
                gate.load_state_dict(source.state_dict())
            short = cut(idx)
            halted = passes == j + 1
            close(out.hidden[halted], short.hidden[halted])
            close(out.logits[halted], short.logits[halted])
            went_on = passes > j + 1  # the others did change after pass j
            assert (out.hidden[went_on] - short.hidden[went_on]).abs().max() > 1e-3


def test_bottom_k_on_a_hand_computed_example() -> None:
    gates = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.05, 0.8, 0.6, 0.2, 0.4])
    assert bottom_k_mean(gates, 0.3).item() == pytest.approx((0.05 + 0.1 + 0.2) / 3)
    assert bottom_k_mean(gates, 0.01).item() == pytest.approx(0.05)  # at least one value
    assert bottom_k_mean(gates, 1.0).item() == pytest.approx(gates.mean().item())
    model = PonderModel(backbone(), PonderConfig(k=0.2, ce_steps=10, k_warmup_steps=4))
    assert [model.k_at(s) for s in (0, 9, 10, 11, 13, 50)] == pytest.approx(
        [0, 0, 0.05, 0.1, 0.2, 0.2])


def test_fixed_schedules_reach_their_average_passes() -> None:
    for kind in ("uniform", "geometric"):
        fractions = schedule_fractions(4, 2.5, kind, 2.0)
        alive = [math.prod(1 - q for q in fractions[:i]) for i in range(4)]
        assert sum(alive) == pytest.approx(2.5, abs=1e-6)
    assert fractions[1] == pytest.approx(2 * fractions[0])  # geometric: each pass doubles
    draws = token_uniform(torch.arange(4096), torch.arange(4096) % 7, 1, 0)
    assert 0.45 < draws.mean().item() < 0.55 and draws.min() >= 0 and draws.max() < 1
    model = PonderModel(backbone(), PonderConfig(halting="geometric", schedule_passes=2.5))
    with torch.no_grad():
        passes = recorded(model, tokens(16, 64))[1].passes
    assert passes.float().mean().item() == pytest.approx(2.5, abs=0.1)


def test_measure_counts_the_passes_that_ran() -> None:
    """A forced decision pattern (every token halts after its second pass) is what measure()
    charges, and eval_report's ratios follow from it."""
    bb = backbone()
    model = ponder(bb, passes=4)
    with torch.no_grad():
        for j, gate in enumerate(model.gates):
            gate[-1].bias.fill_(100.0 if j == 0 else -100.0)
        runner, m = model.measured()
        runner(tokens(2, 16))
        runner(tokens(3, 8))
    summary = m.summary()
    assert summary["avg_passes"] == 2.0 and summary["passes_histogram"] == [0, 56, 0, 0]
    context = 5.0
    dense = fl.forward_per_token(bb.cfg, context)
    layers = dense["attn_proj"] + dense["attn_scores"] + dense["ffn"]
    soft = 2.0 * V * bb.cfg.d_model
    gate = fl.module_flops(model.gates[0])
    expected = 2 * (layers + dense["lm_head"]) + 2 * (soft + gate)
    assert m.flops_per_token(context) == pytest.approx(expected)
    reference = 4 * (layers + dense["lm_head"]) + 3 * soft
    assert model.reference_flops_per_token(context) == pytest.approx(reference)


# -- training, the command, saving ---------------------------------------------------------------
QUICK = ["train.batch_size=4", "train.eval_batches=2", "train.eval_interval=3",
         "train.log_interval=1", "train.ckpt_interval=3", "optim.warmup_steps=0", "optim.lr=1e-2"]


@pytest.fixture(scope="module")
def ponder_run(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Continued pretraining of the tiny backbone: 2 gates-only steps, then 2 of everything."""
    out = tmp_path_factory.mktemp("ponder") / "run"
    assert main(["ponder", "--backbone", str(tiny_backbone), "--steps", "4", "--out", str(out),
                 "ponder.gates_only_steps=2", "ponder.ce_steps=1", "ponder.k_warmup_steps=2",
                 *QUICK]) == 0
    return out


def test_ponder_run_trains_in_stages_evaluates_and_loads_back(ponder_run: Path,
                                                              tiny_backbone: Path) -> None:
    metrics = json.loads((ponder_run / "metrics.json").read_text())
    assert metrics["method"] == "ponder" and metrics["steps"] == 4
    assert 1 <= metrics["avg_passes"] <= 4 and sum(metrics["passes_histogram"]) > 0
    assert metrics["flops_vs_backbone"] > 1 and 0 < metrics["flops_vs_fixed_k"] <= 1.01
    log = [json.loads(line) for line in (ponder_run / "metrics.jsonl").read_text().splitlines()]
    assert "bottom_k" not in log[0] and log[-1]["k"] > 0
    loaded = load_run(ponder_run).model
    original = load_run(tiny_backbone).model
    assert isinstance(loaded, PonderModel) and loaded.backbone_trained()
    assert any(not torch.equal(a, b) for a, b in zip(loaded.backbone.parameters(),
                                                     original.parameters(), strict=True))
    assert main(["eval", str(ponder_run), "--batches", "2"]) == 0
    result = json.loads((ponder_run / "eval.json").read_text())
    assert result["kind"] == "ponder" and len(result["passes_histogram"]) == 4


def test_the_gates_only_stage_leaves_the_backbone_alone(tiny_backbone: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "gates-only"
    assert main(["ponder", "--backbone", str(tiny_backbone), "--steps", "2", "--out", str(out),
                 "ponder.gates_only_steps=2", *QUICK]) == 0
    loaded, original = load_run(out).model, load_run(tiny_backbone).model
    for a, b in zip(loaded.backbone.parameters(), original.parameters(), strict=True):
        assert torch.equal(a, b)
    fresh = PonderModel(original, PonderConfig())
    assert any(not torch.equal(a, b) for a, b in zip(loaded.gates.parameters(),
                                                     fresh.gates.parameters(), strict=True))


def test_bench_and_generate_serve_a_ponder_run(ponder_run: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """tau 0.999 halts every token after its first pass (the gates start near 0.88)."""
    assert main(["bench", str(ponder_run), "--settings", "0.0001,0.999", "--prefill-batch", "2",
                 "--prefill-len", "16", "--decode-batches", "1,2", "--decode-tokens", "4",
                 "--reps", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {(r["phase"], r["batch"]) for r in rows} == {("prefill", 2), ("decode", 1),
                                                        ("decode", 2)}
    for r in rows:
        if r["setting"] == 0.999:
            assert r["realised"]["avg_passes"] == 1.0 and r["ideal_speedup"] > 2.5
    capsys.readouterr()
    assert main(["generate", str(ponder_run), "--prompt", "ROMEO:", "--max-new-tokens", "5",
                 "--show-depth", "--no-color"]) == 0
    assert '"avg_passes"' in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_transformers_backbones_run_through_ponder(family: str, tmp_path: Path) -> None:
    tok = build_tokenizer("gpt2", None).hf
    torch.manual_seed(0)
    shape = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=128)
    hf = (LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **shape)) if family == "llama"
          else GPTNeoXForCausalLM(GPTNeoXConfig(**shape)))
    where = tmp_path / family
    hf.save_pretrained(str(where))
    tok.save_pretrained(str(where))
    out = tmp_path / "run"
    assert main(["ponder", "--backbone", str(where), "--passes", "2", "--steps", "2",
                 "--out", str(out), "ponder.gates_only_steps=1", "ponder.ce_steps=0",
                 "data.block_size=16", "train.batch_size=2", "train.eval_batches=1",
                 "train.eval_interval=2", "train.ckpt_interval=2", "optim.warmup_steps=0"]) == 0
    model = load_run(out).model
    assert isinstance(model, PonderModel) and isinstance(model.backbone, HFAdapter)
    assert json.loads((out / "metrics.json").read_text())["val_loss"] > 0


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    model = ponder(backbone("llama"), passes=3)
    loaded = assert_round_trip(model, tokens(2, 10), tmp_path / "saved")
    assert isinstance(loaded, PonderModel) and loaded.passes == 3


@pytest.mark.parametrize("options, match", [
    (["ponder.passes=0"], "passes"), (["ponder.lam=-0.1"], "lam"), (["ponder.k=0"], "config k"),
    (["ponder.k=1.5"], "config k"), (["ponder.tau=1"], "tau"), (["ponder.tau=-0.1"], "tau"),
    (["ponder.halting=uniform"], "schedule_passes"),
])
def test_bad_options_are_one_line_errors(capsys: pytest.CaptureFixture, tmp_path: Path,
                                         options: list[str], match: str) -> None:
    assert_user_error(capsys, "ponder", "--preset", "tiny", "--steps", "1",
                      "--out", str(tmp_path / "x"), *options, match=match)


def test_bad_backbones_and_bench_options_are_one_line_errors(
        capsys: pytest.CaptureFixture, tmp_path: Path, ponder_run: Path) -> None:
    assert_user_error(capsys, "ponder", "--backbone", str(tmp_path / "missing"), "--out",
                      str(tmp_path / "x"), match="does not exist")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert_user_error(capsys, "ponder", "--backbone", str(bert), "--out", str(tmp_path / "x"),
                      match="unsupported")
    assert_user_error(capsys, "ponder", "--passes", "0", "--out", str(tmp_path / "x"),
                      match="not positive")
    small = ["--prefill-len", "16", "--decode-tokens", "4"]
    assert_user_error(capsys, "bench", str(ponder_run), "--settings", "1", *small, match="tau")
    assert_user_error(capsys, "bench", str(ponder_run), "--settings", "0", *small, match="tau")
