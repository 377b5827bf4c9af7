"""Self-spec: greedy self-speculative decoding is exactly the dense model's (a Llama-family
transformers model with a tokenizer-sized vocabulary, batch > 1, prompts of different lengths,
both drafters), the cache it leaves is the dense model's, speculative sampling keeps the target
distribution (a chi-square test against the distribution enumerated exactly, which the usual
mistakes fail), distillation trains the adapter with the right gradient, and runs fit, load,
evaluate, generate and bench."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from test_cli import assert_user_error
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

import adadepth.generate as gen
from adadepth.cli import main
from adadepth.depth import selfspec_search as search
from adadepth.depth.kangaroo import distill
from adadepth.depth.selfspec import SelfSpec, SelfSpecConfig
from adadepth.depth.selfspec_drafter import SelfSpecSpeculator
from adadepth.errors import UserError
from adadepth.generate import Round, Sampler, generate, generate_many, speculative
from adadepth.hf.adapters import HFAdapter
from adadepth.runs import load_run

BIG_V = 49_152  # SmolLM2's vocabulary
RESIDUAL = ("o_proj.weight", "down_proj.weight")


def llama(vocab: int, quiet: list[int], seed: int = 0, layers: int = 4,
          quiet_scale: float = 0.03) -> HFAdapter:
    """A random Llama whose blocks move the residual stream (x30), except the `quiet` ones
    (x30 x quiet_scale): a draft without them agrees with the full model often but not always,
    so that drafts are both kept and rejected."""
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(RESIDUAL):
                p.mul_(30 * (quiet_scale if any(f"layers.{i}." in name for i in quiet)
                             else 1.0))
    return HFAdapter(hf).eval()


def with_live_adapter(model: SelfSpec, scale: float = 0.3) -> SelfSpec:
    """An adapter that does something (its output projections start at zero)."""
    if model.adapter is not None:
        gen_ = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in model.adapter.block.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=gen_) * 0.02 * scale)
    return model


PROMPTS = [[5, 9, 200], [7, 1, 2, 3, 44, 3000, 12, 40_000], [8, 8, 100, 2000, 3]]
DRAFTERS = [  # (options, the layers the draft leaves out or exits before)
    ({"drafter": "skip", "skip": [1]}, [1]),
    ({"drafter": "skip", "skip": [0, 2]}, [0, 2]),  # nothing exact to reuse: verify from scratch
    ({"drafter": "exit", "exit_layer": 2}, [2, 3]),  # attention + FFN adapter
    ({"drafter": "exit", "exit_layer": 2, "adapter": "attention"}, [2, 3]),
    ({"drafter": "exit", "exit_layer": 3, "adapter": "none"}, [3]),
]


@pytest.mark.parametrize("options, quiet", DRAFTERS)
@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_greedy_is_exactly_the_dense_models(options: dict, quiet: list[int], threshold: float,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch of 3 prompts of lengths 3, 8 and 5, 24 new tokens, 49,152-token vocabulary; the
    dense reference decodes each prompt alone."""
    bb = llama(BIG_V, quiet)
    model = with_live_adapter(SelfSpec(bb, SelfSpecConfig(
        threshold=threshold, draft_tokens=3, draft_vocab=0, **options)).eval())
    kept: list[list[int]] = []
    runner, m = model.measured()
    observe = SelfSpecSpeculator.observe

    def watched(self, accepted: Tensor, active: Tensor) -> None:
        kept.append(accepted[active].tolist())
        observe(self, accepted, active)

    monkeypatch.setattr(SelfSpecSpeculator, "observe", watched)
    with torch.no_grad():
        expected = [generate(bb, torch.tensor([p]), 24, temperature=0.0)[0].tolist()
                    for p in PROMPTS]
        got = generate_many(runner, PROMPTS, 24, temperature=0.0)
    assert got == expected
    rate = m.summary()["acceptance_rate"]
    assert 0 < rate < 1  # drafts were both kept and rejected ...
    assert any(len(set(row)) > 1 for row in kept)  # ... by different rows in one round
    if threshold == 0:  # never stopping early: every round drafts the cap, or what is left
        assert m.summary()["drafted_per_round"] > 2


def test_draft_length_follows_the_drafts_confidence() -> None:
    """Threshold 1: every drafted token is below it, so each round drafts one token; threshold
    0: rounds draft the cap (less only where the rows need fewer); at the median of the draft's
    confidences, rounds stop on their own, in between; the output is the dense model's
    throughout."""
    bb = llama(BIG_V, [1])
    with torch.no_grad():
        bb.hf.lm_head.weight.mul_(60)  # peaked distributions: confidences that vary
    expected = generate(bb, torch.tensor(PROMPTS[:1]), 30, temperature=0.0)
    probe = SelfSpec(bb, SelfSpecConfig(drafter="skip", skip=[1], draft_vocab=0)).eval()
    _, conf = search.teacher_forced(probe, expected)
    drafted = {}
    for threshold in (1.0, 0.0, float(conf.median())):
        model = SelfSpec(bb, SelfSpecConfig(drafter="skip", skip=[1], threshold=threshold,
                                            draft_tokens=4, draft_vocab=0)).eval()
        runner, m = model.measured()
        with torch.no_grad():
            got = generate_many(runner, PROMPTS[:1], 30, temperature=0.0)
        assert got[0] == expected[0].tolist()
        drafted[threshold] = m.summary()["drafted_per_round"]
    median = float(conf.median())
    assert drafted[1.0] == 1.0
    assert drafted[0.0] > 3
    assert 1.0 < drafted[median] < drafted[0.0]


def test_the_searchs_acceptance_is_what_a_round_drafts() -> None:
    """The skip search measures, at every position, the draft's first token exactly as a round
    drafts it after a prefill of the positions before it (the full model's K/V as context);
    the teacher-forced shortcut (the draft's own states as context) is not that."""
    bb = llama(BIG_V, [1, 2], quiet_scale=0.2)
    model = SelfSpec(bb, SelfSpecConfig(drafter="skip", skip=[1, 2], threshold=0.0,
                                        draft_tokens=1, draft_vocab=0)).eval()
    windows = torch.randint(0, BIG_V, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = search.reference(model, windows, cache=True)
        agree, conf = search.first_draft(model, windows, ref, chunk=5)
        for w in range(2):
            for t in range(12):
                cache = model.new_cache(1, 14)
                if t:
                    model(windows[w:w + 1, :t], cache, 0)
                rnd = Round(windows[w:w + 1, t:t + 1], torch.tensor([t]), None, 1, Sampler())
                token = model.speculator.draft(rnd, cache).tokens[0, 0]
                assert bool(token == ref.target[w, t]) == bool(agree[w, t])
        teacher, _ = search.teacher_forced(model, windows, ref)
    assert agree.any() and not agree.all()
    assert not torch.equal(teacher, agree)
    assert bool(((conf > 0) & (conf <= 1)).all())


def test_the_draft_vocabulary_is_a_subset_and_still_exact() -> None:
    """Drafting over the 512 most frequent tokens of some text: still the dense output."""
    bb = llama(BIG_V, [3])
    model = SelfSpec(bb, SelfSpecConfig(drafter="exit", exit_layer=3, adapter="none",
                                        threshold=0.0, draft_tokens=3, draft_vocab=512)).eval()
    with torch.no_grad():
        expected = [generate(bb, torch.tensor([p]), 24, temperature=0.0)[0].tolist()
                    for p in PROMPTS]
        model.choose_vocab(torch.tensor([row[:27] for row in expected]))
        assert len(model.vocab) == 512 and not model.full_vocab
        runner, m = model.measured()
        got = generate_many(runner, PROMPTS, 24, temperature=0.0)
    assert got == expected
    assert m.summary()["acceptance_rate"] > 0.3  # the text's own tokens are in the subset


@pytest.mark.parametrize("options, quiet", [DRAFTERS[0], DRAFTERS[2]])
def test_the_cache_left_behind_is_the_dense_models(options: dict, quiet: list[int]) -> None:
    """After speculative decoding, every layer's K/V at every row's positions are what a dense
    prefill of the row's output computes: the skip draft's inexact K/V were overwritten."""
    bb = llama(BIG_V, quiet)
    model = with_live_adapter(SelfSpec(bb, SelfSpecConfig(
        threshold=0.0, draft_tokens=3, draft_vocab=0, **options)).eval())
    n = 20
    with torch.no_grad():
        idx = torch.tensor([p + p[-1:] * (8 - len(p)) for p in PROMPTS])
        lengths = torch.tensor([len(p) for p in PROMPTS])
        cache = model.new_cache(3, 8 + n + 4)
        logits = model(idx, cache, 0).logits
        cache.truncate(lengths)
        logits = logits[torch.arange(3), lengths - 1]
        out = speculative(model.speculator, cache, logits, lengths, n, Sampler())
        for row in range(3):
            seq = torch.cat([idx[row, :lengths[row]], out[row, :-1]]).unsqueeze(0)
            fed = seq.shape[1]  # the last new token is never fed
            dense = bb.new_cache(1, fed)
            bb(seq, dense, 0)
            for layer in range(bb.n_layers):
                valid = cache.valid[layer, row]
                # a row may keep drafts beyond the tokens it was asked for (a round makes up
                # to 4), exact but cut from its output; nothing past them is valid
                assert valid[:fed].all() and not valid[fed + 4:].any()
                torch.testing.assert_close(cache.k[layer][row, :, :fed], dense.k[layer][0, :, :fed],
                                           atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(cache.v[layer][row, :, :fed], dense.v[layer][0, :, :fed],
                                           atol=1e-5, rtol=1e-5)


def test_the_measurement_counts_the_blocks_that_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tally's token-blocks are the blocks the backbone really ran (prefill, drafts,
    rejected ones and verify passes, counted independently by wrapping `run_layer`), and the
    FLOPs per token are those blocks, the head reads and the draft's head reads per token."""
    bb = llama(BIG_V, [1])
    model = SelfSpec(bb, SelfSpecConfig(drafter="skip", skip=[1], threshold=0.0,
                                        draft_tokens=3, draft_vocab=0)).eval()
    ran = {"blocks": 0}
    run_layer = bb.run_layer

    def counted(i: int, x: Tensor, ctx) -> Tensor:
        ran["blocks"] += x.shape[0] * x.shape[1]
        return run_layer(i, x, ctx)

    monkeypatch.setattr(bb, "run_layer", counted)
    runner, m = model.measured()
    with torch.no_grad():
        generate_many(runner, PROMPTS, 16, temperature=0.0)
    t = m.tally
    assert t.get("layers") == ran["blocks"] > 0
    c, context = model.costs, 10.0
    scores = 2 * 2.0 * context * model.cfg.n_heads * model.cfg.head_dim
    by_hand = (ran["blocks"] * (c["layer"] + scores) + t.get("heads") * c["head"]
               + t.get("draft_heads") * c["head"]) / t.tokens
    assert m.flops_per_token(context) == pytest.approx(by_hand)


# -- speculative sampling keeps the target distribution ------------------------------------
SMALL_V, NEW = 5, 4


def chi_square_p(counts: Tensor, probs: Tensor, min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square test of `counts` against `probs`; cells expected fewer
    than `min_expected` times are pooled into one."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < min_expected
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def target_distribution(bb: HFAdapter, prompt: list[int], sample: Sampler) -> Tensor:
    """P(x_1..x_NEW | prompt) for every one of the SMALL_V ** NEW continuations, exactly: the
    product of the full model's sampling distributions along each of them."""
    grid = torch.cartesian_prod(*[torch.arange(SMALL_V)] * NEW)  # (V^NEW, NEW), row-major
    seqs = torch.cat([torch.tensor(prompt).expand(len(grid), -1), grid], 1)
    with torch.no_grad():
        logits = bb(seqs[:, :-1]).logits[:, len(prompt) - 1:]
    probs = sample.probs(logits)  # (V^NEW, NEW, V)
    return probs.gather(2, grid.unsqueeze(-1)).squeeze(-1).prod(1)


def sampled_counts(model: torch.nn.Module, prompt: list[int], sample: Sampler, rows: int,
                   batches: int) -> Tensor:
    counts = torch.zeros(SMALL_V ** NEW)
    weights = SMALL_V ** torch.arange(NEW - 1, -1, -1)
    with torch.no_grad():
        for _ in range(batches):
            idx = torch.tensor([prompt] * rows)
            speculator = model.speculator
            cache = model.new_cache(rows, len(prompt) + NEW + speculator.draft_tokens + 1)
            logits = model(idx, cache, 0).logits[:, -1]
            out = speculative(speculator, cache, logits, len(prompt), NEW, sample)
            counts += torch.bincount((out * weights).sum(1), minlength=len(counts))
    return counts


ACCEPT = gen.accept  # the real rule, before any test patches it


def broken_accept(draft: Tensor, q: Tensor | None, p_logits: Tensor,
                  sample: Sampler) -> tuple[Tensor, Tensor]:
    """The classic mistake: after a rejection, resample from p instead of max(0, p - q)."""
    accepted, _ = ACCEPT(draft, q, p_logits, sample)
    p = sample.probs(p_logits)
    at = accepted.view(-1, 1, 1).expand(-1, 1, p.shape[-1])
    return accepted, sample.draw(p.gather(1, at).squeeze(1)).squeeze(1)


@pytest.mark.parametrize("top_k, draft_vocab", [(None, 0), (3, 3)])
def test_speculative_sampling_keeps_the_target_distribution(
        top_k: int | None, draft_vocab: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """24,000 samples of 4 tokens (625 outcomes) drawn by speculative sampling, batch 2,000 with
    rows at their own positions: the chi-square test against the exact target distribution
    passes, while the same test rejects (p < 1e-6) sampling from the draft and the classic
    resampling mistake, so it is not a test that passes whatever the sampler does."""
    bb = llama(SMALL_V, [], quiet_scale=1.0, layers=3)
    model = with_live_adapter(SelfSpec(bb, SelfSpecConfig(
        drafter="exit", exit_layer=1, threshold=0.0, draft_tokens=3,
        draft_vocab=draft_vocab)).eval(), scale=20.0)
    prompt = [1, 3, 0, 2]
    sample = Sampler(temperature=1.0, top_k=top_k, generator=torch.Generator().manual_seed(7))
    target = target_distribution(bb, prompt, sample)
    assert float(target.sum()) == pytest.approx(1.0, abs=1e-5)
    runner, m = model.measured()
    counts = sampled_counts(runner, prompt, sample, rows=2000, batches=12)
    rate = m.summary()["acceptance_rate"]
    assert 0.2 < rate < 0.95  # the draft differs from the target: rejections do happen
    assert chi_square_p(counts, target) > 1e-3
    # the same test rejects a sampler that ignores the verifier ...
    draft_only = Sampler(temperature=1.0, top_k=top_k, generator=torch.Generator().manual_seed(8))
    monkeypatch.setattr(gen, "accept", lambda d, q, p, s: (
        torch.full((d.shape[0],), d.shape[1]), gen.Sampler.__call__(s, p[:, -1])[0][:, 0]))
    assert chi_square_p(sampled_counts(model, prompt, draft_only, 2000, 12), target) < 1e-6
    # ... and one that resamples from p after a rejection
    monkeypatch.setattr(gen, "accept", broken_accept)
    wrong = Sampler(temperature=1.0, top_k=top_k, generator=torch.Generator().manual_seed(9))
    assert chi_square_p(sampled_counts(model, prompt, wrong, 2000, 12), target) < 1e-6


# -- training the adapter -----------------------------------------------------------------------
def test_fused_distillation_is_the_kl_and_its_gradient() -> None:
    """The chunked, fused loss equals KL(p || q) summed over positions, and its gradient equals
    autograd's through the whole logits; the checkpointed fallback agrees."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    student = torch.randn(37, 16, requires_grad=True)
    teacher = torch.randn(37, 16)
    p = head(teacher).log_softmax(-1)
    reference = (p.exp() * (p - head(student).log_softmax(-1))).sum()
    (g_ref,) = torch.autograd.grad(reference, student)
    for layer in (head, None):  # fused; checkpointed chunks through a callable head
        kl, t_arg, s_arg = distill(student, teacher, head, layer, chunk=10)
        (g,) = torch.autograd.grad(kl, student)
        torch.testing.assert_close(kl, reference.float(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
        assert torch.equal(t_arg, head(teacher).argmax(-1))
        assert torch.equal(s_arg, head(student).argmax(-1))


def test_distillation_trains_only_the_adapter_and_lowers_the_kl() -> None:
    bb = llama(300, [])
    model = SelfSpec(bb, SelfSpecConfig(drafter="exit", exit_layer=1)).train()
    model.set_trainable(from_scratch=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapter.") for n in trainable)
    before = {n: p.clone() for n, p in bb.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    x = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(30):
        step_loss = model.training_loss(x[:, :-1], x[:, 1:], step)
        metrics = step_loss.metrics
        opt.zero_grad()
        step_loss.loss.backward()
        opt.step()
        losses.append(metrics["kl"])
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(p, before[n]) for n, p in bb.named_parameters())
    assert float(model.counts.sum()) == 2 * 30 * x[:, 1:].numel()  # teacher argmax + targets
    with pytest.raises(UserError, match="--backbone"):
        model.set_trainable(from_scratch=True)


def test_from_pretrained_and_save_pretrained_keep_the_draft(tmp_path: Path) -> None:
    """A transformers model in, a self-spec model out and back: the trained adapter and what
    calibration chose (skip set, threshold, cap, draft vocabulary) survive the round trip."""
    from causality import assert_round_trip

    import adadepth

    bb = llama(300, [2])
    model = adadepth.from_pretrained(bb.hf, method="self-spec", drafter="exit", exit_layer=2,
                                     draft_vocab=50)
    assert isinstance(model, SelfSpec)
    with_live_adapter(model)
    with torch.no_grad():
        model.choose_vocab(torch.randint(0, 300, (2, 20), generator=torch.Generator()
                                         .manual_seed(3)))
    model.set_policy(0.35, 5)
    loaded = assert_round_trip(model, torch.randint(0, 300, (2, 7)), tmp_path / "saved")
    assert isinstance(loaded, SelfSpec)
    assert (loaded.threshold, loaded.cap) == (pytest.approx(0.35), 5)
    assert torch.equal(loaded.vocab, model.vocab)
    assert all(torch.equal(a, b) for a, b in zip(loaded.adapter.parameters(),
                                                 model.adapter.parameters(), strict=True))
    with torch.no_grad():
        expected = generate(bb, torch.tensor([PROMPTS[0]]), 12, temperature=0.0)
        assert torch.equal(generate(loaded, torch.tensor([PROMPTS[0]]), 12, temperature=0.0),
                           expected)


# -- runs, end to end -----------------------------------------------------------------------------
def llama_dir(folder: Path) -> Path:
    """A tiny random Llama with the GPT-2 tokenizer (50,257 tokens), saved as a transformers
    directory; layer 2 barely moves the residual, so a search should find it."""
    hf, tok = tiny_llama()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(RESIDUAL):
                p.mul_(30 * (0.01 if "layers.2." in name else 1.0))
    hf.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


QUICK = ["train.batch_size=2", "train.eval_batches=2", "data.block_size=48",
         "self-spec.search_windows=2", "self-spec.search_len=32", "self-spec.timed_prompts=1",
         "self-spec.timed_tokens=8", "self-spec.draft_vocab=2048"]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("selfspec")
    backbone = llama_dir(root / "llama")
    out = {}
    for drafter, extra in (("skip", []), ("exit", ["self-spec.exit_layer=2"])):
        folder = root / drafter
        assert main(["fit", "--method", "self-spec", "--backbone", str(backbone), "--steps", "3",
                     "--out", str(folder), *QUICK, f"self-spec.drafter={drafter}", *extra]) == 0
        out[drafter] = folder
    return out


def test_the_search_is_stored_in_the_run(runs_dir: dict[str, Path]) -> None:
    metrics = json.loads((runs_dir["skip"] / "metrics.json").read_text())
    path = metrics["search_path"]
    assert [len(r["skip"]) for r in path] == list(range(1, len(path) + 1))
    assert path[0]["skip"] == [2]  # the layer that barely moves the residual goes first
    assert all(r["policies"] and "estimated_speedup" in r["policies"][0] for r in path)
    finalists = metrics["finalists"]
    assert len(finalists) == 4 and all("measured_speedup" in r for r in finalists)
    assert len({tuple(r["skip"]) for r in finalists[:3]}) == 3  # drafts first, then caps
    assert metrics["chosen"] == max(finalists, key=lambda r: r["measured_speedup"])
    model = load_run(runs_dir["skip"]).model
    assert isinstance(model, SelfSpec)
    assert model.skipped() == metrics["skip"] and model.cap == metrics["draft_tokens"]
    assert model.threshold == pytest.approx(metrics["threshold"])
    # batches have their own cap, timed at batch 4 here (2 x 2 held-out windows)
    batched = metrics["batched_finalists"]
    assert {r["draft_tokens"] for r in batched} == {1, 2, 3, 4, 6, 8}
    assert all(r["batch"] == 4 for r in batched)
    assert model.batched_cap == metrics["batched_draft_tokens"] == max(
        batched, key=lambda r: r["measured_speedup"])["draft_tokens"]
    assert len(model.vocab) == 2048 and int(model.vocab.max()) < 50257
    assert not model.backbone_trained() and metrics["trainable_parameters"] == 0


def test_the_exit_drafter_trains_its_adapter_and_restores_it(runs_dir: dict[str, Path]) -> None:
    metrics = json.loads((runs_dir["exit"] / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["trainable_parameters"] > 0
    assert metrics["training_flops"] > 0
    model = load_run(runs_dir["exit"]).model
    again = load_run(runs_dir["exit"]).model
    assert model.adapter is not None
    assert all(torch.equal(a, b) for a, b in zip(model.adapter.parameters(),
                                                 again.adapter.parameters(), strict=True))
    assert float(model.adapter.block.attn.o_proj.weight.detach().abs().sum()) > 0  # trained


@pytest.mark.parametrize("drafter", ["skip", "exit"])
def test_eval_generate_and_bench_read_the_run(runs_dir: dict[str, Path], drafter: str,
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    run = runs_dir[drafter]
    assert main(["eval", str(run), "--batches", "1", "--block-size", "32"]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["drafter"] == drafter and 0 <= report["draft_agreement"] <= 1
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "ROMEO: good", "--max-new-tokens", "12",
                 "--temperature", "0", "--num-samples", "2"]) == 0
    err = capsys.readouterr().err
    compute = json.loads(err.split("compute: ", 1)[1].splitlines()[0])
    speed = json.loads(err.split("speed: ", 1)[1].splitlines()[0])
    assert 0 <= compute["acceptance_rate"] <= 1 and speed["tokens_per_s"] > 0
    assert speed["new_tokens"] == 2 * 12
    assert main(["bench", str(run), "--settings", "1,3", "--prefill-batch", "2",
                 "--prefill-len", "16", "--decode-batches", "1,2", "--decode-tokens", "6",
                 "--reps", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    decode = [r for r in rows if r["phase"] == "decode"]
    assert {(r["batch"], r["setting"]) for r in decode} == {(1, 1), (1, 3), (2, 1), (2, 3)}
    for r in decode:
        assert 0 <= r["realised"]["acceptance_rate"] <= 1 and r["measured_speedup"] > 0
        assert r["realised"]["draft_tokens"] == r["setting"]


# -- bad input --------------------------------------------------------------------------------
@pytest.fixture
def quiet_loading() -> Iterator[None]:
    """transformers' "Loading weights" progress bar also writes to stderr; the error line is
    what these tests read."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.mark.parametrize("option, match", [
    ("self-spec.skip=[4]", "layer 4"),
    ("self-spec.skip=[]", "empty"),
    ("self-spec.draft_tokens=0", "draft_tokens"),
    ("self-spec.exit_layer=9", "exit_layer"),
])
def test_bad_options_are_one_line_errors(runs_dir: dict[str, Path], option: str, match: str,
                                         capsys: pytest.CaptureFixture,
                                         quiet_loading: None) -> None:
    backbone = runs_dir["skip"].parent / "llama"
    assert_user_error(capsys, "fit", "--method", "self-spec", "--backbone", str(backbone),
                      "--out", str(runs_dir["skip"].parent / "bad"), option, match=match)


def test_prompts_longer_than_the_context_are_refused(runs_dir: dict[str, Path],
                                                     capsys: pytest.CaptureFixture,
                                                     quiet_loading: None) -> None:
    model = load_run(runs_dir["skip"]).model
    with pytest.raises(UserError, match="context of 128"):
        generate_many(model, [[1, 2], list(range(120))], 10, temperature=0.0)
    with pytest.raises(UserError, match="at least one token"):
        generate_many(model, [[1, 2], []], 10)
    assert_user_error(capsys, "generate", str(runs_dir["skip"]), "--prompt", "ROMEO " * 120,
                      "--max-new-tokens", "8", match="context")
    assert_user_error(capsys, "bench", str(runs_dir["skip"]), "--settings", "0",
                      match="draft_tokens")
