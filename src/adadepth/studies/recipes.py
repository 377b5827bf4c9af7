"""The aux-loss study's recipes: how big each preset's study is (its backbone and every
controller run); the leaderboard's backbones are these too."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from adadepth.studies import shape

# The general-text corpus of the `paper` recipe: the paper trained on "a fineweb-edu subset".
FINEWEB_EDU = "HuggingFaceFW/fineweb-edu:sample-10BT"


@dataclass(frozen=True)
class Recipe(shape.Recipe):
    """Sizes of one preset's study: the backbone's pretraining and every controller run."""

    corpus: str
    block_size: int
    batch_size: int
    controller_steps: int
    backbone_steps: int = 0  # pretraining steps of the study's own backbone
    tokenizer: str | None = None  # for pretraining; None with a packaged backbone (its own)
    backbone: str | None = None  # a packaged pretrained backbone instead of pretraining one
    max_docs: int | None = None  # documents taken from a streamed corpus (None: all / default)
    routing: dict[str, Any] = field(default_factory=dict)  # routing options of every run
    train: dict[str, Any] = field(default_factory=dict)  # train options of every run


RECIPES = {
    # Sized so that the whole study (backbone included) runs in under 10 minutes on 2 cores.
    # 160 controller steps, not fewer: at 80 the LM-only gate (A3) had barely begun to leave
    # random routing, and its average LM was within seed noise of random's.
    # The oracle labels both controlled layers every step (`oracle_layers: 0`, all): the
    # default labelling, sized for deep models, would label one for G3 on-policy here. The
    # cheap path starts at zero (`low_rank`), as in the study's kept report: a copy of the full
    # FFN (the default, `pruned`) is not the paper's starting point.
    "tiny": Recipe("tiny-shakespeare", 64, 12, controller_steps=160, backbone_steps=600,
                   tokenizer="char", routing={"oracle_layers": 0, "cheap": "low_rank"}),
    # Sized in benchmarks/README.md ("The aux-loss study at `small` scale") so that the study
    # with --ablations (45 controller runs) finishes within 90 minutes on a 2-core CPU.
    # The probe (benchmarks/study_cost.py) put 16 x 128-token batches, 2000 backbone and 400
    # controller steps at several hours; these sizes came to about an hour with one thread.
    # The oracle labels one controlled layer per step (drawn at random), as the util/rank
    # labels cost a forward per labelled layer.
    "small": Recipe("tiny-shakespeare", 64, 8, controller_steps=160, backbone_steps=800,
                    tokenizer="char",
                    routing={"oracle_layers": 1, "calibration_windows": 64,
                             "cheap": "low_rank"}),
    # The published setting where it is known: a general web-text corpus (fineweb-edu),
    # 20,000 controller steps, a backbone of about the paper's size (SmolLM2-135M, 30 layers).
    # A GPU job; see benchmarks/README.md for its estimated cost.
    "paper": Recipe(FINEWEB_EDU, 512, 16, controller_steps=20_000, backbone="smollm2-135m",
                    max_docs=100_000),
}


def recipe_for(preset: str, corpus: str | None = None, steps: int | None = None) -> Recipe:
    """The preset's recipe with the command line's overrides."""
    recipe = shape.recipe_of(RECIPES, preset, "aux-losses")
    if corpus is not None and corpus != recipe.corpus:
        # max_docs was chosen for the default corpus; another one is read whole (or, streamed,
        # up to the corpora module's default).
        recipe = dataclasses.replace(recipe, corpus=corpus, max_docs=None)
    if steps is not None:
        recipe = dataclasses.replace(recipe, controller_steps=steps)
    return recipe
