"""The aux-loss study end to end on a small backbone (every arm runs, the report is filled, a
re-run resumes), its bad input, and its report's figures on hand-made runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adadepth.cli import main
from adadepth.errors import UserError
from adadepth.studies import runner
from adadepth.studies.aux_losses import AuxLosses
from adadepth.studies.findings import policy_table, recovery, scales_table
from adadepth.studies.recipes import FINEWEB_EDU, recipe_for
from adadepth.studies.runner import RECORD
from adadepth.studies.scales import other_scales
from adadepth.studies.shape import StudyOptions
from adadepth.studies.stats import by_arm
from adadepth.train import checkpoint as ck

STEPS, SEEDS = 3, 2
ARMS = {"G1", "G3", "G1-A3", "G3-A3", "random", "all-full", "all-cheap"}


def run_study(out: Path, steps: int = STEPS) -> dict:
    return runner.run(AuxLosses(StudyOptions(seeds=SEEDS, steps=steps, device="cpu",
                                             show_progress=False)), out)


@pytest.fixture(scope="module")
def study(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study") / "study"
    # A backbone already in place (with its eval.json) is reused instead of pretrained.
    shutil.copytree(tiny_backbone, out / "backbone")
    ck.write_json_atomic(out / "backbone" / "eval.json", {"val_loss": 3.0})
    run_study(out)
    return out


def test_study_runs_every_arm_and_writes_a_filled_report(study: Path) -> None:
    results = json.loads((study / "results.json").read_text())
    # Random routing matched to a learned arm's FLOPs runs only where a budget matches them.
    assert {(r["arm"], r["seed"]) for r in results["runs"] if r["group"] != "matched"} == {
        (arm, seed) for arm in ARMS for seed in range(SEEDS)}
    assert results["costs"]["gates"].keys() == {"g1", "g3"}
    by_name = {r["arm"]: r for r in results["runs"]}
    assert all(f == 1.0 for f in by_name["all-full"]["full_fraction_causal"])
    assert all(f == 0.0 for f in by_name["all-cheap"]["full_fraction_causal"])
    for r in results["runs"]:
        assert len(r["lm_curve"]) == STEPS and r["wall_s"] > 0
    assert results["backbone"]["val_loss"] == 3.0 and "path" not in results["backbone"]
    assert results["recipe"]["controller_steps"] == STEPS
    report = (study / "report.md").read_text()
    for arm in ARMS:
        assert f"| {arm} " in report or f"| {arm} |" in report, arm
    assert "n/a" not in report.split("##")[1]  # the main table has a figure in every cell
    # The backbone is named by what it is, never by where it lies.
    assert "the `tiny` preset backbone pretrained by this study" in report
    assert str(study) not in report
    for section in ("How findings are judged", "How the FLOPs proxy is counted",
                    "Share of the loss gap recovered", "at equal inference FLOPs",
                    "Where the inference FLOPs go", "across scales"):
        assert section in report, section
    for png in ("loss_curves.png", "full_fraction.png", "flops_proxy.png"):
        assert (study / png).stat().st_size > 1000


def test_a_rerun_with_the_same_recipe_resumes(study: Path) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in (study / "runs").glob("*/metrics.json")}
    run_study(study)
    assert stamps == {p: p.stat().st_mtime_ns for p in (study / "runs").glob("*/metrics.json")}


def test_a_study_folder_of_another_recipe_is_refused(study: Path, capsys) -> None:
    before = (study / RECORD).read_text()
    with pytest.raises(UserError, match="another recipe.*controller_steps"):
        run_study(study, steps=STEPS + 1)
    line = one_line_error(capsys, "study", "--out", study, "--steps", STEPS,
                          "--corpus", "shakespeare")
    assert "another recipe" in line and "corpus" in line
    assert (study / RECORD).read_text() == before


def test_runs_without_a_recorded_recipe_are_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "runs" / "G1-seed0").mkdir(parents=True)
    (tmp_path / "runs" / "G1-seed0" / "config.json").write_text("{}")
    assert "cannot be checked" in one_line_error(capsys, "study", "--out", tmp_path)


def one_line_error(capsys, *argv: object) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip("\n").split("\n")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("adadepth: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv, match", [
    (["--preset", "huge"], "no recipe for preset 'huge'"),
    (["--corpus", "missing/plays.txt"], "no such file"),
    (["--corpus", "{bad}"], "unknown corpus"),
    (["--compare", "missing-study"], "no study results"),
    (["--report-only"], "no study results"),
])
def test_bad_study_input_is_one_line_and_exit_2(argv: list[str], match: str, tmp_path: Path,
                                               capsys) -> None:
    line = one_line_error(capsys, "study", "--out", tmp_path / "out", *argv)
    assert match in line
    assert not (tmp_path / "out" / RECORD).exists()  # refused before anything was written


@pytest.mark.parametrize("argv, match", [
    (["ponder", "--compare", "other"], "the ponder study does not take --compare"),
    (["ensemble", "--corpus", "shakespeare"], "the ensemble study does not take --corpus"),
    (["leaderboard", "--ablations"], "the leaderboard study does not take --ablations"),
    (["aux-losses", "--methods", "mod"], "the aux-losses study does not take --methods"),
])
def test_another_studys_option_is_refused_not_ignored(argv: list[str], match: str,
                                                      tmp_path: Path, capsys) -> None:
    line = one_line_error(capsys, "study", *argv, "--out", tmp_path / "out")
    assert match in line
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_an_unreadable_corpus_file_is_refused(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "plays.txt"
    bad.write_bytes(b"\xff\xfe not utf-8 \xff")
    assert "not UTF-8" in one_line_error(capsys, "study", "--out", tmp_path / "o", "--corpus", bad)


def test_the_paper_recipe_streams_general_text_and_corpus_overrides_every_preset() -> None:
    assert recipe_for("paper").corpus == FINEWEB_EDU and recipe_for("paper").max_docs
    for preset in ("tiny", "small", "paper"):
        recipe = recipe_for(preset, corpus="shakespeare", steps=7)
        assert (recipe.corpus, recipe.controller_steps) == ("shakespeare", 7)
    assert recipe_for("paper", corpus="shakespeare").max_docs is None


# -- the report's figures on hand-made runs ----------------------------------------------------
def run(arm: str, seed: int, val: float, **extra) -> dict:
    """A run with what the findings read; training figures default to the validation loss."""
    figures = {"avg_lm": val, "best_lm": val, "lm_curve": [val] * 8, "grad_norm_mean": 1.0,
               "flops_proxy": 1.0, "prediction_variance": None}
    return {"arm": arm, "seed": seed, "val_lm_causal": val, **figures, **extra}


def test_recovery_is_the_share_of_the_gap_per_seed() -> None:
    runs = [run("all-cheap", 0, 2.0), run("all-full", 0, 1.0), run("G1", 0, 1.25),
            run("all-cheap", 1, 3.0), run("all-full", 1, 2.0), run("G1", 1, 2.5),
            run("G3", 0, 2.2),  # worse than all-cheap: a negative share, not clipped
            run("all-cheap", 2, 1.0), run("all-full", 2, 1.0), run("G1", 2, 1.0)]  # no gap
    shares = recovery(by_arm(runs))
    assert shares["G1"] == pytest.approx({0: 0.75, 1: 0.5})
    assert shares["G3"] == pytest.approx({0: -0.2})
    assert "all-cheap" not in shares and "all-full" not in shares


def test_on_policy_against_off_policy_per_seed() -> None:
    runs = [run("all-cheap", s, 2.0) for s in (0, 1)] + [run("all-full", s, 1.0) for s in (0, 1)]
    runs += [run("G1", 0, 1.5), run("G1", 1, 1.5), run("G1-onpolicy", 0, 1.4),
             run("G1-onpolicy", 1, 1.6)]
    lines = policy_table(by_arm(runs))
    assert any(line.startswith("| G1 | 0 | 1.5000 | 1.4000 | 50.0 % | 60.0 %") for line in lines)
    assert "- G1: on-policy lower validation loss (causal) in 1/2 seeds" in lines[-1]
    assert "+0.1000, -0.1000 nats (mean +0.0000 ± 0.1000 SE): **within noise**" in lines[-1]
    assert policy_table(by_arm(runs[:4])) == []  # no on-policy arm: no section


def grad_norm_study(g1_over_g3: float) -> dict:
    """Three seeds whose G1 / G3 gradient-norm ratios lie within 1 % of `g1_over_g3`."""
    return by_arm([run("G1", s, 1.5, grad_norm_mean=g1_over_g3 * (1 + 0.01 * (s - 1)))
                   for s in range(3)] + [run("G3", s, 1.5) for s in range(3)])


def test_scales_table_with_one_scale_says_the_others_did_not_run() -> None:
    table = scales_table({"tiny": grad_norm_study(1.36)})
    row = next(line for line in table if line.startswith("| G3 gradient norm"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # Lower in every seed, but judged against the paper's factor (at least 5x): contradicted.
    assert cells[1] == "~10.3x lower"
    assert cells[2].startswith("1.36x lower (lower in 3/3 seeds); at least 5x, per seed G1's / "
                               "G3's − 5: -3.65, -3.64, -3.63")
    assert cells[2].endswith("**contradicted**")
    assert cells[3:] == ["not run", "not run", "one scale only"]
    a1 = next(line for line in table if "A1" in line)
    assert "ablations not run" in a1


def test_scales_table_shows_each_scale_and_the_trend() -> None:
    table = scales_table({"tiny": grad_norm_study(1.36), "small": grad_norm_study(6.0)})
    row = next(line for line in table if line.startswith("| G3 gradient norm"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].endswith("**contradicted**") and cells[3].startswith("6.00x lower")
    assert cells[3].endswith("**reproduced**")
    assert cells[4:] == ["not run", "toward the paper (tiny → small)"]


def test_other_scales_come_from_the_given_paths_only(tmp_path: Path) -> None:
    """Nothing is read from a clone's docs/ unless given (an installed wheel has none)."""
    assert other_scales("tiny", []) == {}
    given = []
    for preset in ("tiny", "small"):
        folder = tmp_path / f"aux-losses-{preset}"
        folder.mkdir()
        ck.write_json_atomic(folder / "results.json", {"preset": preset, "runs": []})
        given.append(str(folder))
    paper = tmp_path / "mine.json"
    ck.write_json_atomic(paper, {"preset": "paper", "runs": [run("G1", 0, 1.0)]})
    found = other_scales("tiny", [*given, str(paper)])
    assert set(found) == {"small", "paper"}  # the current preset's own column is its own
    assert found["paper"]["source"] == str(paper) and found["small"]["source"] == given[1]
    paper.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        other_scales("tiny", [str(paper)])


# -- what every study shares: the runner ------------------------------------------------------
KEPT = Path(__file__).resolve().parents[1] / "docs" / "studies"


@pytest.mark.parametrize("name, kept, compare", [
    ("aux-losses", "aux-losses-tiny", "aux-losses-small"),
    ("aux-losses", "aux-losses-small", "aux-losses-tiny"),
    ("ensemble", "ensemble-tiny", None),
    ("ponder", "ponder-tiny", None),
    ("leaderboard", "leaderboard-tiny", None),
    ("leaderboard", "leaderboard-smollm2", None),
])
def test_report_only_rewrites_a_kept_report_unchanged(name: str, kept: str, compare: str | None,
                                                      tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / kept
    shutil.copytree(KEPT / kept, out)
    (out / "report.md").unlink()
    # A report names another scale's study by the path it was given: docs/studies/...
    monkeypatch.chdir(KEPT.parents[1])
    argv = ["study", name, "--report-only", "--out", str(out)]
    if compare:
        argv += ["--compare", f"docs/studies/{compare}/results.json"]
    assert main(argv) == 0
    assert (out / "report.md").read_text() == (KEPT / kept / "report.md").read_text()


@pytest.mark.parametrize("name, first, then, differs", [
    ("ensemble", ["--steps", "5"], [], "tune_steps"),
    ("ponder", ["--steps", "5"], ["--steps", "6"], "tracks"),
    ("leaderboard", ["--preset", "small"], [], "preset"),
])
def test_every_study_refuses_a_folder_of_another_recipe(name: str, first: list[str],
                                                        then: list[str], differs: str,
                                                        tmp_path: Path, capsys) -> None:
    """The recipe is recorded before any run, so a resume under another is refused at once."""
    options = {"steps": int(first[1])} if first[0] == "--steps" else {"preset": first[1]}
    kind = runner.studies()[name]
    ck.write_json_atomic(tmp_path / RECORD, kind(StudyOptions(**options)).record())
    line = one_line_error(capsys, "study", name, "--out", tmp_path, *then)
    assert "another recipe" in line and differs in line
    line = one_line_error(capsys, "study", "aux-losses", "--report-only", "--out", tmp_path)
    assert f"holds the {name} study, not aux-losses" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORD]  # nothing ran
