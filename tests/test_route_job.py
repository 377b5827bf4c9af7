"""`adadepth route` as a job: checkpoints of every regime, resuming only the same recipe, the
reference loss under the run's own precision setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import assert_user_error

from adadepth.cli import main
from adadepth.runs import load_run

SHORT = ["train.eval_batches=1", "routing.calibration_windows=8", "train.ckpt_interval=1"]


def route(backbone: Path, out: Path, *extra: str, steps: int = 2) -> int:
    """Flags first, then key=value overrides (argparse takes the positionals in one run)."""
    flags = [e for e in extra if "=" not in e]
    overrides = [e for e in extra if "=" in e]
    return main(["route", "--backbone", str(backbone), "--out", str(out), "--steps", str(steps),
                 *flags, *SHORT, *overrides])


def test_joint_training_saves_and_reloads(tiny_backbone: Path, tmp_path: Path) -> None:
    """Joint training changes the backbone; its checkpoint holds it once, beside the routers
    (safetensors refused the shared tensors before), and the run loads back to the same model."""
    out = tmp_path / "joint"
    assert route(tiny_backbone, out, "--aux", "none", "routing.regime=joint",
                 "optim.lr=1e-2") == 0
    loaded = load_run(out).model
    original = load_run(tiny_backbone).model
    with loaded.original_backbone() as trained:
        changed = [not torch.equal(a, b) for a, b in zip(
            trained.state_dict().values(), original.state_dict().values(), strict=True)]
    assert any(changed)  # the backbone trained, and what was saved is the trained one
    x = torch.randint(0, loaded.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(load_run(out).model(x).logits, loaded(x).logits)


@pytest.mark.parametrize("change, match", [
    (["--gate", "g3", "--aux", "util,rank,jepa"], "gate"),
    (["--budget", "0.25"], "budget"),
    (["routing.cheap=skip"], "cheap"),
])
def test_resume_with_another_recipe_is_refused(capsys: pytest.CaptureFixture,
                                               tiny_backbone: Path, tmp_path: Path,
                                               change: list[str], match: str) -> None:
    out = tmp_path / "run"
    assert route(tiny_backbone, out) == 0
    capsys.readouterr()
    before = (out / "config.json").read_text()
    flags = [c for c in change if "=" not in c]
    overrides = [c for c in change if "=" in c]
    assert_user_error(capsys, "route", "--backbone", tiny_backbone, "--out", out, "--steps", 3,
                      "--resume", *flags, *SHORT, *overrides, match=match)
    assert (out / "config.json").read_text() == before  # nothing overwritten
    assert route(tiny_backbone, out, "--resume", steps=3) == 0  # the same recipe resumes
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


def test_reference_loss_follows_train_amp(tiny_backbone: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every evaluation of a run with train.amp=false, the backbone's reference loss included,
    runs without autocast (on a GPU the reference was in bf16 while the run was not)."""
    from adadepth.train import loop

    seen: list[bool] = []
    real = loop.autocast

    def spy(device: torch.device, enabled: bool):
        seen.append(enabled)
        return real(device, enabled)

    monkeypatch.setattr(loop, "autocast", spy)
    assert route(tiny_backbone, tmp_path / "run", "train.amp=false") == 0
    assert seen and not any(seen)


def test_generate_shows_where_the_compute_went(tiny_backbone: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """--show-depth prints each token's full-path layer count beneath it when colour is off
    (2 controlled layers: 0, 1 or 2), with a legend; the counts are the ones the routed forward
    recorded, so they average to the realised full fraction printed beside them."""
    out = tmp_path / "run"
    assert route(tiny_backbone, out) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "30",
                 "--show-depth", "--no-color", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    text, marks, legend = captured.out.split("\n---")[0].split("\n")[-3:]
    assert text.startswith("ROMEO:") and "full path" in legend
    counts = [int(c) for c in marks.replace(" ", "")]
    assert len(counts) == 6 + 30 - 1 and set(counts) <= {0, 1, 2}  # the last token never fed
    compute = json.loads(captured.err.split("compute: ")[1])
    assert sum(counts) / (2 * len(counts)) == pytest.approx(compute["full_fraction"], abs=1e-4)
    assert main(["generate", str(tiny_backbone), "--prompt", "A", "--show-depth"]) == 2
