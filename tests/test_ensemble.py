"""The late-layer ensemble and the tuning regimes beside it (LoRA through peft, full tuning):
what the model computes, what trains, what is saved, and the commands around them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import assert_user_error

import adadepth
from adadepth.cli import main
from adadepth.config import ModelConfig, validate
from adadepth.depth import method_spec
from adadepth.depth.dispatch import Call
from adadepth.depth.ensemble import EnsembleModel, distillation
from adadepth.hf.adapters import HFAdapter
from adadepth.model import Transformer
from adadepth.runs import load_run

CFG = ModelConfig(vocab_size=40, d_model=32, n_layers=4, n_heads=4, d_ff=48, max_seq_len=32)
D, V, LAYERS = 32, 40, 4


def backbone(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CFG).eval()


def build(name: str, bb: torch.nn.Module | None = None, **options):
    spec = method_spec(name)
    return spec.build(bb if bb is not None else backbone(), validate(spec.config, options))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=48,
                                        num_hidden_layers=LAYERS, num_attention_heads=4,
                                        max_position_embeddings=32)).eval()


def all_on_last(model: EnsembleModel) -> None:
    """Route every token to the last late layer, exactly (softmax of -inf is 0)."""
    with torch.no_grad():
        router = model.late.router
        scores = router.bias if hasattr(router, "bias") else router.logits
        scores.fill_(float("-inf"))
        scores[-1] = 0.0


def perturb(model: torch.nn.Module) -> None:
    """Move every trainable weight off its initial value (LoRA's B starts at zero)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


IDX = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("router", ["token", "global"])
@pytest.mark.parametrize("hf", [False, True])
def test_all_weight_on_the_last_layer_with_copied_norms_is_the_base(router: str,
                                                                    hf: bool) -> None:
    bb = HFAdapter(tiny_llama()) if hf else backbone()
    with torch.no_grad():
        base = bb(IDX).logits
        model = build("ensemble", bb, layers=3, router=router)
        all_on_last(model)
        assert torch.equal(model(IDX).logits, base)
        # cached decoding too: prompt, then one token at a time
        cache = model.new_cache(2, 16)
        steps = [model(IDX[:, :6], cache, 0).logits]
        steps += [model(IDX[:, t:t + 1], cache, t).logits for t in range(6, 11)]
        torch.testing.assert_close(torch.cat(steps, 1), base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", ["token", "global"])
def test_routing_weights_sum_to_one(router: str) -> None:
    model = build("ensemble", router=router)
    perturb(model.late)
    normed = torch.randn(3, 5, D)
    for k in (1, 2, 4):
        w = model.late.weights(normed, k)
        assert w.shape == (3, 5, k) and (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 5))
    _, w = model.layer_outputs(IDX)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 11))
    if router == "token":  # a learned router gives each token its own weights
        assert w.std(dim=(0, 1)).max() > 0


def test_mixing_states_is_mixing_logits_and_log_probs_are_another_model() -> None:
    model = build("ensemble")
    perturb(model.late)
    assert model.mix_states
    with torch.no_grad():
        fast = model(IDX).logits
        model.mix_states = False
        explicit = model(IDX).logits
        torch.testing.assert_close(fast, explicit, rtol=1e-5, atol=1e-5)
        model.options.combine = "log_probs"
        assert not torch.allclose(model(IDX).logits, explicit, atol=1e-3)


def test_a_soft_capped_head_is_not_mixed_through_the_states(monkeypatch) -> None:
    bb = backbone()
    monkeypatch.setattr(bb, "unembed", lambda u: 30 * torch.tanh(bb.lm_head(u) / 30))
    assert not build("ensemble", bb).mix_states
    assert build("ensemble").mix_states


def trainable(model: torch.nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def test_only_the_intended_parameters_train() -> None:
    n, r = 3, 4
    norms, router = n * D, D * n + n
    # LoRA on q and v of every layer: A is r x d_in, B is d_out x r (here d_out = d_in = D)
    lora = LAYERS * 2 * (r * D + D * r)
    expected = {"ensemble": norms + router, "lora": lora,
                "ensemble+lora": norms + router + lora,
                "full": sum(p.numel() for p in backbone().parameters())}
    options = {"ensemble": {"layers": n}, "lora": {"r": r},
               "ensemble+lora": {"layers": n, "lora": {"r": r}}, "full": {}}
    for name, opts in options.items():
        model = build(name, **opts)
        model.set_trainable(from_scratch=False)
        names = trainable(model)
        assert model.trainable_parameters() == sum(names.values()) == expected[name], name
        if name != "full":
            assert all(k.startswith("late.") or ".lora_" in k for k in names), name
    global_router = build("ensemble", layers=n, router="global")
    global_router.set_trainable(from_scratch=False)
    assert global_router.trainable_parameters() == norms + n


def test_the_distillation_teacher_gets_no_gradient() -> None:
    model = build("ensemble", layers=3, lambda_distill=1.0)
    model.set_trainable(from_scratch=False)
    perturb(model.late)
    _, distill = model.losses(IDX, IDX)
    assert distill.item() > 0
    distill.backward()
    teacher = model.late.norms[-1].weight.grad
    assert teacher is None or not teacher.any()
    for student in model.late.norms[:-1]:
        assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    # one layer alone has nothing to distil
    assert distillation([torch.randn(2, 3, V)]).item() == 0.0


def test_training_costs_follow_what_trains() -> None:
    flops = {name: build(name).training_flops_per_token(16)
             for name in ("ensemble", "lora", "full")}
    assert flops["ensemble"] < flops["lora"] < flops["full"]
    assert flops["full"] == pytest.approx(3 * build("full").reference_flops_per_token(8.5))


@pytest.mark.parametrize("combine, heads", [("logits", 1.0), ("log_probs", 3.0)])
def test_measure_counts_the_head_evaluations_that_ran(combine: str, heads: float) -> None:
    model = build("ensemble", layers=3, combine=combine)
    runner, m = model.measured()
    with torch.no_grad():
        runner(IDX)
    summary = m.summary()
    assert summary["head_evaluations"] == heads and summary["tokens"] == IDX.numel()
    head = 2.0 * D * V
    assert m.flops_per_token(6.0) - model.reference_flops_per_token(6.0) == pytest.approx(
        (heads - 1) * head + 2 * D * 3 + 2 * 3 * (D if heads == 1 else V))
    runner, m = model.measured(Call(force=True))
    with torch.no_grad():
        runner(IDX)  # the base model runs, and is not the method's to count
    assert m.summary()["tokens"] == 0


@pytest.mark.parametrize("name, options", [
    ("ensemble", {"layers": 3}), ("ensemble+lora", {"layers": 2, "lora": {"r": 4}}),
    ("lora", {"r": 4, "lora_alpha": 8}), ("full", {})])
def test_method_state_round_trips_to_identical_logits(name: str, options: dict) -> None:
    model = build(name, **options)
    model.set_trainable(from_scratch=False)
    perturb(model)
    state = model.method_state()
    assert any(k.startswith("lora.") for k in state) == ("lora" in name)
    loaded = build(name, **options)  # a fresh backbone of the same weights, fresh adapters
    loaded.load_method_state(state)
    with torch.no_grad():
        assert torch.equal(loaded(IDX).logits, model(IDX).logits)


@pytest.mark.parametrize("name, options", [
    ("ensemble", {"layers": 2}), ("ensemble+lora", {"layers": 3, "lora": {"r": 4}}),
    ("lora", {"r": 2})])
def test_save_pretrained_round_trips_with_peft_adapters(tmp_path: Path, name: str,
                                                        options: dict) -> None:
    model = adadepth.from_pretrained(tiny_llama(), method=name, **options)
    model.set_trainable(from_scratch=False)
    perturb(model)
    with torch.no_grad():
        before = model(IDX).logits
    saved = adadepth.save_pretrained(model, tmp_path / "saved")
    loaded = adadepth.from_pretrained(saved)
    with torch.no_grad():
        assert torch.equal(loaded(IDX).logits, before)
    if "lora" not in name:
        assert not (saved / "adapter").exists()
        return
    # peft's own format: a PeftModel over the plain transformers model reads the adapters
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny_llama(), str(saved / "adapter")).eval()
    with torch.no_grad():
        reference = model.backbone.hf(IDX).logits  # the tuned body through its own head
        torch.testing.assert_close(peft_model(IDX).logits, reference)


@pytest.fixture(scope="module")
def tuned(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tune") / "run"
    assert main(["tune", "--backbone", str(tiny_backbone), "--method", "ensemble+lora",
                 "--corpus", "shakespeare:comedies", "--steps", "3", "--out", str(out),
                 "ensemble+lora.layers=3", "ensemble+lora.lora.r=4", "train.batch_size=4",
                 "train.eval_batches=2", "train.ckpt_interval=3", "optim.warmup_steps=0"]) == 0
    return out


def test_tune_trains_a_run_that_eval_generate_bench_and_lm_eval_serve(
        tuned: Path, tiny_backbone: Path, tmp_path: Path, capsys) -> None:
    metrics = json.loads((tuned / "metrics.json").read_text())
    assert metrics["method"] == "ensemble+lora" and metrics["steps"] == 3
    assert len(metrics["late_layer_loss"]) == 3 and 0 <= metrics["val_accuracy"] <= 1
    model = load_run(tuned).model
    assert isinstance(model, EnsembleModel) and model.adapters
    original = load_run(tiny_backbone).model
    with model.original_backbone():  # LoRA layers out: the backbone itself did not change
        for (name, a), b in zip(model.backbone.state_dict().items(),
                                original.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert main(["eval", str(tuned), "--batches", "2"]) == 0
    assert main(["generate", str(tuned), "--prompt", "ROMEO:", "--max-new-tokens", "4"]) == 0
    assert '"late_layers": 3' in capsys.readouterr().err
    assert main(["bench", str(tuned), "--prefill-batch", "2", "--prefill-len", "16",
                 "--decode-batches", "1", "--decode-tokens", "3", "--reps", "1",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["setting"] for r in rows} == {1.0, 2.0, 3.0}
    assert model.current_knob_value() == 3.0  # as trained: every late layer mixed
    assert all(r["ideal_speedup"] < 1 for r in rows)  # adapters and the ensemble cost a little
    from adadepth.hf.harness import AdadepthLM

    class Request:
        args = ("ROMEO:", " and")

    (score, _), = AdadepthLM(run=str(tuned)).loglikelihood([Request()])
    assert score < 0


@pytest.mark.parametrize("extra, match", [
    (["ensemble.layers=0"], "greater than or equal to 1"),
    (["ensemble.layers=9"], "has 4"),
    (["ensemble.lambda_distill=-1"], "lambda_distill"),
])
def test_bad_ensemble_options(tiny_backbone: Path, capsys, extra: list[str], match: str) -> None:
    assert_user_error(capsys, "tune", "--backbone", str(tiny_backbone), "--method", "ensemble",
                      "--out", "x", *extra, match=match)


@pytest.mark.parametrize("method, extra, match", [
    ("lora", ["lora.r=0"], "peft rejected"),
    ("lora", ["lora.target_modules=[nope]"], "peft rejected"),
    ("lora", ["lora.colour=red"], "peft rejected"),
    ("ensemble+lora", ["ensemble+lora.lora.lora_dropout=2"], "peft rejected"),
])
def test_lora_options_peft_rejects(tiny_backbone: Path, capsys, method: str, extra: list[str],
                                   match: str) -> None:
    assert_user_error(capsys, "tune", "--backbone", str(tiny_backbone), "--method", method,
                      "--out", "x", *extra, match=match)


def test_bad_backbones_and_methods(tmp_path: Path, capsys) -> None:
    assert_user_error(capsys, "tune", "--backbone", str(tmp_path / "missing"), "--method",
                      "ensemble", "--out", "x", match="does not exist")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert_user_error(capsys, "tune", "--backbone", str(bert), "--method", "lora", "--out", "x",
                      match="unsupported model family")
    assert_user_error(capsys, "tune", "--backbone", str(bert), "--method", "ensembel",
                      "--out", "x", match="invalid choice")


def test_genre_corpora() -> None:
    from adadepth.data import load_corpus
    from adadepth.errors import UserError

    comedies = load_corpus("shakespeare:comedies")
    both = load_corpus("shakespeare:comedies+roman")
    assert 0 < len(comedies.train[0]) < len(both.train[0])
    assert "ROSALIND:" in comedies.train[0] + comedies.val[0]  # As You Like It is a comedy
    with pytest.raises(UserError, match="genres: comedies"):
        load_corpus("shakespeare:sonnets")
