"""Learned routing against random routing at equal realised inference FLOPs (the aux-loss study).

A learned gate runs on every token at every controlled layer, whichever path the token then
takes; random gates cost nothing. At the same full fraction a learned arm therefore runs more
FLOPs than random routing, and the fair comparison is random routing at the budget whose
realised FLOPs equal the learned arm's. Random routing's FLOPs are linear in its budget b: every
controlled layer runs the full FFN on b of the tokens and the cheap path on the rest, so its
FLOPs run from all-cheap's (b = 0) to the dense model's (b = 1) in a straight line
(`matched_budget`).

New studies train random routing at that budget for each learned arm (`random@ARM`); for
results without those runs, random routing's loss at a learned arm's FLOPs is read along the
random family's measured points (all-cheap, random at each budget it ran, all-full), linearly
interpolated between the two that bracket it and never extrapolated (`random_at_flops`).

Every function but `layer_costs` / `preset_costs` reads runs grouped by arm and returns figures
or markdown lines; nothing is read from disk.
"""

from __future__ import annotations

import statistics
from typing import Any

from adadepth.studies.findings import BASELINE_ENDS, recovery
from adadepth.studies.protocol import judged
from adadepth.studies.stats import Arms, in_order, mean, mean_std, paired, read_along

# The gates of random routing: all-cheap is its budget 0 and all-full its budget 1.
RANDOM_FAMILY = ("all-cheap", "random", "all-full")
# A random run whose realised FLOPs lie this close to a learned arm's (in units of the dense
# model's) counts as measured at them: the matched arms realise their budget to within ~0.001
# of the full fraction, a few 1e-4 of the dense FLOPs.
TOLERANCE = 0.005
# A decomposition that does not reproduce the runs' recorded FLOPs this closely is not shown.
CHECK = 1e-3


def matched_budget(flops: float, all_cheap: float) -> float | None:
    """The budget at which random routing realises `flops` (inference FLOPs / dense), given
    all-cheap's: random routing's FLOPs are all_cheap + b * (1 - all_cheap), its gates costing
    nothing. None where no budget strictly between 0 and 1 does (the learned arm costs as much
    as the dense model or more, or less than routing every token cheap)."""
    b = (flops - all_cheap) / (1 - all_cheap)
    return b if 0 < b < 1 else None


def gate_of(rs: list[dict[str, Any]]) -> str | None:
    return rs[0].get("gate") if rs else None


def learned(arms: Arms) -> list[str]:
    """Arms whose gates are trained (not random routing at any budget), in report order."""
    return [a for a, rs in arms.items() if gate_of(rs) not in (*RANDOM_FAMILY, None)]


def all_cheap_flops(arms: Arms) -> float | None:
    return mean([r.get("flops_ratio_inference") for r in arms.get("all-cheap", [])])


def random_points(arms: Arms) -> dict[int, list[tuple[float, float]]]:
    """Per seed, (realised inference FLOPs, validation loss under causal routing) of every run
    of random routing: all-cheap, random at every budget it ran, all-full."""
    points: dict[int, list[tuple[float, float]]] = {}
    for rs in arms.values():
        if gate_of(rs) in RANDOM_FAMILY:
            for r in rs:
                if r.get("flops_ratio_inference") is not None:
                    points.setdefault(r["seed"], []).append(
                        (r["flops_ratio_inference"], r["val_lm_causal"]))
    return points


def random_at_flops(arms: Arms, arm: str) -> dict[int, tuple[float, str]]:
    """Per seed, random routing's validation loss at `arm`'s realised inference FLOPs and how
    it was read ("measured" or "interpolated"); seeds where no random run brackets them (the
    arm costs more than the dense model) are left out."""
    points = random_points(arms)
    out = {}
    for r in arms.get(arm, []):
        read = read_along(points.get(r["seed"], []), r["flops_ratio_inference"], TOLERANCE)
        if read is not None:
            out[r["seed"]] = read
    return out


def same_budget_random(arms: Arms, arm: str) -> str | None:
    """The random arm trained at `arm`'s budget (not one matched to another arm's FLOPs)."""
    budget = arms[arm][0].get("budget")
    return next((a for a, rs in arms.items() if gate_of(rs) == "random"
                 and rs[0].get("group") != "matched" and rs[0].get("budget") == budget), None)


def share_of_gap(arms: Arms, losses: dict[int, float]) -> dict[int, float]:
    """Per seed, the share of the all-cheap -> all-full gap that `losses` recover."""
    cheap, full = ({r["seed"]: r["val_lm_causal"] for r in arms.get(a, [])}
                   for a in BASELINE_ENDS)
    return {s: (cheap[s] - v) / (cheap[s] - full[s]) for s, v in losses.items()
            if s in cheap and s in full and cheap[s] > full[s]}


def pct(values: dict[int, float]) -> str:
    return mean_std(list(values.values()), ".1f", ".1f", scale=100, unit=" %")


def how_read(reads: dict[int, tuple[float, str]]) -> str:
    kinds = [how for _, how in reads.values()]
    if len(set(kinds)) == 1:
        return kinds[0]
    return ", ".join(f"{kinds.count(k)} seeds {k}" for k in sorted(set(kinds)))


def equal_cost_table(arms: Arms) -> list[str]:
    """Each learned arm against random routing at the same full fraction (the random arm of its
    budget) and at the same realised inference FLOPs, per seed, with the rule's verdicts."""
    names, cheap = learned(arms), all_cheap_flops(arms)
    if not names or cheap is None or not all(a in arms for a in BASELINE_ENDS):
        return ["(needs learned arms, the all-cheap and all-full baselines and inference FLOPs)"]
    shares = recovery(arms)
    head = ["arm", "budget", "full fraction (causal)", "inference FLOPs (x dense)",
            "recovered", "equal full fraction: random recovered",
            "random's loss − the arm's, per seed (nats): verdict",
            "equal FLOPs: random's budget", "random recovered (how read)",
            "random's loss − the arm's, per seed (nats): verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        rs = arms[name]
        flops = mean([r["flops_ratio_inference"] for r in rs])
        cells = [name, f"{rs[0].get('budget', 0):g}",
                 mean_std([statistics.mean(r["full_fraction_causal"]) for r in rs]),
                 mean_std([r["flops_ratio_inference"] for r in rs], ".3f", ".1g"),
                 pct(shares.get(name, {}))]
        other = same_budget_random(arms, name)
        if other is None:
            cells += ["no random arm at this budget", "n/a"]
        else:
            diffs = paired(arms, name, other, "val_lm_causal")
            cells += [pct(shares.get(other, {})), judged(in_order(diffs))]
        reads = random_at_flops(arms, name)
        budget = matched_budget(flops, cheap) if flops is not None else None
        if not reads:
            cells += ["none", f"no random budget costs as much: the arm costs {flops:.2f}x "
                      "the dense model", "n/a"]
        else:
            mine = {r["seed"]: r["val_lm_causal"] for r in rs}
            diffs = {s: loss - mine[s] for s, (loss, _) in reads.items()}
            random_share = share_of_gap(arms, {s: loss for s, (loss, _) in reads.items()})
            cells += [f"{budget:.3f}" if budget is not None else "n/a",
                      f"{pct(random_share)} ({how_read(reads)})", judged(in_order(diffs))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def saves_nothing(arms: Arms) -> list[str]:
    """A plain sentence for each learned arm that costs the dense model's FLOPs or more, as
    markdown lines ending in a blank one; none where every arm saves."""
    out = []
    for name in learned(arms):
        rs = arms[name]
        flops = mean([r["flops_ratio_inference"] for r in rs])
        if flops is not None and flops >= 1:
            out.append(f"- {name} at its trained budget ({rs[0].get('budget', 0):g}) costs "
                       f"{flops:.2f}x the dense model's FLOPs: it saves nothing.")
    return [*out, ""] if out else []


# -- the cost of routing, decomposed ---------------------------------------------------------------
def layer_costs(model: Any) -> dict[str, Any]:
    """Forward FLOPs per token at one controlled layer of a routed model (`RoutedModel`): its
    full FFN, its cheap path and its gate (with its causal predictor, if any), and how many
    layers are controlled. Every controlled layer has the same shapes."""
    from adadepth import flops as fl
    from adadepth.depth.routing import cheap_kind

    r = model.routers[0]
    gate = fl.module_flops(r.gate) + (fl.module_flops(r.predictor) if r.predictor is not None
                                      else 0.0)
    return {"ffn": fl.ffn(model.cfg), "cheap": fl.module_flops(r.cheap), "gate": gate,
            "cheap_kind": cheap_kind(model.options.cheap, r.full),
            "layers": len(model.routers)}


def costs_of(models: dict[str, Any], source: str) -> dict[str, Any]:
    """The study's routing costs from one routed model per learned gate (by gate name)."""
    per_gate = {g: layer_costs(m) for g, m in models.items()}
    first = next(iter(per_gate.values()))
    return {"ffn": first["ffn"], "cheap": first["cheap"], "cheap_kind": first["cheap_kind"],
            "layers": first["layers"], "gates": {g: c["gate"] for g, c in per_gate.items()},
            "source": source}


def preset_costs(results: dict[str, Any]) -> dict[str, Any] | None:
    """Routing costs rebuilt for results that did not record them (studies from before they
    did): the preset's backbone shape with the recipe's routing options. Those studies ran the
    low-rank cheap path (the default then; their recipes recorded none). None where the
    backbone is not the preset's own (a packaged one) or its recorded shape differs."""
    import torch

    from adadepth.config import preset
    from adadepth.depth.routing import RoutedModel, RoutingConfig
    from adadepth.errors import UserError
    from adadepth.model import Transformer

    bb = results.get("backbone", {})
    if not bb.get("pretrained_by_study"):
        return None
    try:
        cfg = preset(results["preset"])
    except UserError:  # an unknown preset: nothing to rebuild from
        return None
    if (bb.get("n_layers"), bb.get("d_model")) != (cfg.n_layers, cfg.d_model):
        return None
    # The vocabulary only sizes the head, which no per-layer cost reads.
    cfg = cfg.model_copy(update={"vocab_size": 2})
    options = {"cheap": "low_rank", **results.get("recipe", {}).get("routing", {})}
    gates = sorted({r["gate"] for r in results["runs"]} - set(RANDOM_FAMILY))
    with torch.random.fork_rng():  # building modules draws initial weights
        models = {g: RoutedModel(Transformer(cfg), RoutingConfig(**{**options, "gate": g,
                                                                     "aux": []}))
                  for g in gates}
    return costs_of(models, f"rebuilt from the `{results['preset']}` preset's shape and the "
                            "recipe's routing options")


def dense_flops(arms: Arms, costs: dict[str, Any]) -> float | None:
    """The dense model's forward FLOPs per token, from all-cheap's recorded inference FLOPs:
    routing every token cheap saves (FFN - cheap) at every controlled layer and runs no gate."""
    cheap = all_cheap_flops(arms)
    if cheap is None or cheap >= 1:
        return None
    return costs["layers"] * (costs["ffn"] - costs["cheap"]) / (1 - cheap)


def predicted_flops(run: dict[str, Any], costs: dict[str, Any], dense: float) -> float:
    """A run's inference FLOPs / dense from the decomposition at its realised full fractions."""
    saved = sum((1 - f) * (costs["ffn"] - costs["cheap"]) for f in run["full_fraction_causal"])
    gate = costs["gates"].get(run.get("gate"), 0.0) * len(run["full_fraction_causal"])
    return 1 + (gate - saved) / dense


def kilo(flops: float) -> str:
    """FLOPs to three figures: 213k, 1.66M."""
    if flops >= 1e6:
        return f"{flops / 1e6:.3g}M"
    return f"{flops / 1e3:.3g}k" if flops >= 1e3 else f"{flops:.3g}"


def cost_words(arms: Arms, costs: dict[str, Any] | None) -> list[str]:
    """Where the inference FLOPs go, in words: each gate's cost per controlled layer against the
    FFN it may replace, checked against every run's recorded FLOPs."""
    dense = dense_flops(arms, costs) if costs else None
    if costs is None or dense is None:
        return ["(the routing costs of these runs are not known: not decomposed)"]
    runs = [r for rs in arms.values() for r in rs if r.get("flops_ratio_inference") is not None]
    worst = max(abs(predicted_flops(r, costs, dense) - r["flops_ratio_inference"])
                for r in runs)
    if worst > CHECK:
        return [f"(the routing costs {costs['source']} miss the runs' recorded inference FLOPs "
                f"by up to {worst:.3f} of the dense model's: not decomposed)"]
    ffn, cheap, n = costs["ffn"], costs["cheap"], costs["layers"]
    all_cheap = all_cheap_flops(arms)
    assert all_cheap is not None  # dense_flops read it
    gates = {a: gate_of(arms[a]) for a in learned(arms)}
    words = [f"**Where the inference FLOPs go.** Forward FLOPs per token ({costs['source']}, "
             "counted as `flops.module_flops` counts them; with all-cheap's recorded FLOPs they "
             f"give every run's recorded inference FLOPs to within {CHECK:g} of the dense "
             "model's). Each of the "
             f"{n} controlled layers has an FFN of {kilo(ffn)} FLOPs; a token routed cheap runs "
             f"the cheap path instead ({costs['cheap_kind']}, {kilo(cheap)} FLOPs), saving "
             f"{kilo(ffn - cheap)} there, so routing every token cheap with gates that cost "
             f"nothing (all-cheap) costs {all_cheap:.3f} of the dense model, and random routing "
             f"at budget b costs {all_cheap:.3f} + b x {1 - all_cheap:.3f}. A learned gate runs "
             "on every token at every controlled layer, whichever path the token then takes:"]
    parts = []
    for g in sorted(set(gates.values()) & costs["gates"].keys()):
        cost = costs["gates"][g]
        every_cheap = all_cheap + n * cost / dense
        parts.append(f"{g.upper()}'s gate costs {kilo(cost)} FLOPs per layer ({cost / ffn:.0%} "
                     f"of the FFN it may replace), so it saves FLOPs at a layer only where more "
                     f"than {cost / (ffn - cheap):.0%} of the tokens go cheap, and routing every "
                     f"token cheap under it still costs {every_cheap:.3f} of the dense model")
    words.append("; ".join(parts) + ".")
    trained = [f"{a} {mean([r['flops_ratio_inference'] for r in arms[a]]):.3f}"
               for a in learned(arms) if arms[a][0].get("group") == "main"]
    if trained:
        words.append(f"At their trained budgets the main arms cost: {', '.join(trained)} (x "
                     "dense).")
    return [" ".join(words)]
