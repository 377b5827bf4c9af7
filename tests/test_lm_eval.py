"""lm-evaluation-harness the way its users run it: `adadepth eval --tasks`, lm-eval's own
command line with model `adadepth`, and lm-eval's `hf` model beside ours in one process, on a
local task (JSON lines and a YAML, offline)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import assert_user_error, run_cli
from test_hf import MC_ROWS, MC_TASK

from adadepth import eval as ev
from adadepth import flops as fl
from adadepth import runs
from adadepth.cli import main

TASK = "adadepth_tiny_mc"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding one local multiple-choice task, found through --include-path."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (folder / "tiny_mc.yaml").write_text(MC_TASK.format(data=data))
    return folder


def files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# Evaluates lm-eval's `hf` model and ours on the same weights in one process, having imported
# ours first or after lm-eval had resolved its own model: the import order must not matter.
ONE_PROCESS = """
import json, sys
order, model_dir, include, task = sys.argv[1:]
if order == "adadepth_first":
    import adadepth.hf.harness
    from lm_eval.api.registry import get_model
else:
    from lm_eval.api.registry import get_model
    get_model("hf")
    import adadepth.hf.harness
import lm_eval
from lm_eval.tasks import TaskManager

manager = TaskManager(include_path=include, include_defaults=False)  # the local task alone
out = {}
for name, args in (("hf", {"pretrained": model_dir, "dtype": "float32"}),
                   ("adadepth", {"run": model_dir})):
    r = lm_eval.simple_evaluate(model=name, model_args=args, tasks=[task], task_manager=manager,
                                device="cpu", batch_size=2)
    out[name] = {"model": get_model(name).__name__, "acc": r["results"][task]["acc,none"],
                 "loglikelihoods": [[float(c[0]) for c in s["filtered_resps"]]
                                    for s in sorted(r["samples"][task], key=lambda s: s["doc_id"])]}
print(json.dumps(out))
"""


@pytest.mark.parametrize("order", ["adadepth_first", "lm_eval_first"])
def test_lm_eval_hf_and_adadepth_score_alike_in_one_process(order: str, llama_dir: Path,
                                                            task_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", ONE_PROCESS, order, str(llama_dir),
                           str(task_dir), TASK], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["hf"]["model"] == "HFLM" and got["adadepth"]["model"] == "AdadepthLM"
    assert got["adadepth"]["acc"] == got["hf"]["acc"]
    ours, theirs = got["adadepth"]["loglikelihoods"], got["hf"]["loglikelihoods"]
    assert len(ours) == len(MC_ROWS) and [len(r) for r in ours] == [len(r) for r in theirs]
    for a, b in zip(sum(ours, []), sum(theirs, []), strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_eval_tasks_on_a_routed_run_reports_score_and_realised_compute(
        tiny_backbone: Path, task_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "routed"
    assert main(["route", "--backbone", str(tiny_backbone), "--budget", "0.5", "--steps", "2",
                 "--out", str(run), "train.eval_batches=1",
                 "routing.calibration_windows=4"]) == 0
    capsys.readouterr()
    code, stdout, err = run_cli(capsys, "eval", run, "--tasks", TASK, "--include-path",
                                task_dir, "--batch-size", "2")
    assert code == 0, err
    printed = json.loads(stdout)
    saved = json.loads((run / "lm_eval.json").read_text())  # beside eval.json, in the run
    assert printed["out"] == str(run / "lm_eval.json") and "note" not in printed
    assert saved["results"][TASK]["sample_len"] == len(MC_ROWS)
    assert 0.0 <= saved["results"][TASK]["acc,none"] <= 1.0
    assert saved["n-shot"] == {TASK: 0} and saved["adadepth"]["kind"] == "routed"
    compute = saved["compute"]
    # Every token fed was routed, padding included: the method's count is the adapter's.
    assert compute["tokens"] == compute["tokens_run"] > 0
    # Causal routing's controller holds the realised full fraction near the budget...
    assert compute["budget"] == 0.5 and abs(compute["full_fraction"] - 0.5) <= 0.1
    # ...and the FLOPs ratio prices those fractions at the mean context of what ran, against
    # the dense backbone (above 1 here: at width 64 the gates cost more than half the FFNs save).
    model, ctx = runs.load_run(run).model, compute["mean_context"]
    dense = sum(fl.forward_per_token(model.cfg, ctx).values())
    assert compute["flops_ratio"] == pytest.approx(
        model.inference_flops_per_token(ctx, compute["full_fraction_per_layer"]) / dense)
    assert printed["compute"]["tokens_run"] == compute["tokens_run"]


def test_eval_tasks_and_lm_eval_command_line_agree_on_a_transformers_directory(
        llama_dir: Path, task_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    before = files(llama_dir)
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(capsys, "eval", llama_dir, "--tasks", TASK, "--include-path",
                                task_dir, "--limit", "2")
    assert code == 0, err
    printed = json.loads(stdout)
    # Someone else's model: results go under runs/, said so, and its folder is untouched.
    out = Path("runs") / f"eval-{llama_dir.name}" / "lm_eval.json"
    assert printed["out"] == str(out) and "never into its folder" in printed["note"]
    saved = json.loads(out.read_text())
    assert saved["results"][TASK]["sample_len"] == 2 and saved["compute"]["flops_ratio"] == 1.0
    assert files(llama_dir) == before

    # lm-eval's own command line, with model `adadepth` (lm-eval 0.4.13 loads no plugins, so
    # this module is that command line with ours registered); `pretrained=` as for `hf`.
    proc = subprocess.run(
        [sys.executable, "-m", "adadepth.hf.harness", "run", "--model", "adadepth",
         "--model_args", f"pretrained={llama_dir}", "--tasks", TASK, "--include_path",
         str(task_dir), "--limit", "2", "--output_path", str(tmp_path / "lm-eval")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written, = (tmp_path / "lm-eval").rglob("results_*.json")
    theirs = json.loads(written.read_text())["results"][TASK]
    assert theirs["acc,none"] == saved["results"][TASK]["acc,none"]
    assert files(llama_dir) == before


def test_a_known_backbone_is_evaluated_into_runs(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """A known name is loaded as a transformers model; its results never go to the cache."""
    fake = runs.LoadedRun(model=None, tokenizer=None, meta={"kind": "hf", "ref": "smollm2-135m"})
    monkeypatch.setattr(runs, "load_transformers", lambda spec, device: fake)
    target = ev.load_target("smollm2-135m", device="cpu")
    assert target.foreign and target.out == Path("runs/eval-smollm2-135m")
    assert ev.load_target("smollm2-135m", tmp_path, "cpu").out == tmp_path


@pytest.mark.parametrize("argv, match", [
    (["--tasks", "no_such_task"], "unknown task no_such_task: not lm-eval's nor in"),
    (["--tasks", TASK, "--include-path", "{tmp}/missing"], "is not a folder"),
    (["--limit", "2"], "--limit needs --tasks"),
    (["--tasks", TASK, "--corpus", "tiny-shakespeare"], "--corpus is not read with --tasks"),
    (["--tasks", TASK, "--limit", "0"], "neither a count"),
    (["--tasks", TASK, "--num-fewshot", "-1"], "negative"),
    (["--tasks", ","], "no task named"),
])
def test_eval_tasks_bad_input_is_one_line(argv: list[str], match: str, llama_dir: Path,
                                          task_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--include-path" not in argv and argv[0] == "--tasks" and argv[1] != TASK:
        argv += ["--include-path", str(task_dir)]
    assert_user_error(capsys, "eval", llama_dir, *argv, match=match)


def test_eval_tasks_on_a_missing_run_fails_before_reading_tasks(
        task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from adadepth.hf import harness

    def never(*_: object) -> None:
        raise AssertionError("tasks were read for a run that does not exist")

    monkeypatch.setattr(harness, "resolve_tasks", never)
    assert_user_error(capsys, "eval", tmp_path / "nowhere", "--tasks", TASK, "--include-path",
                      task_dir, match="does not exist")


def test_every_command_that_reads_a_model_takes_a_known_backbone_name(
        monkeypatch: pytest.MonkeyPatch, llama_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """generate and bench read `smollm2-135m` as eval does (here a tiny Llama stands in for the
    converted backbone): one way to name a model for every command."""
    from adadepth.cli import main

    tiny = runs.load_transformers(llama_dir)
    asked: list[str] = []
    monkeypatch.setattr(runs, "load_transformers",
                        lambda spec, device="cpu": (asked.append(str(spec)), tiny)[1])
    assert main(["generate", "smollm2-135m", "--prompt", "ab", "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    assert main(["bench", "smollm2-135m", "--device", "cpu"]) == 2  # a dense model: no knob
    assert "bench needs the run of an adaptive method" in capsys.readouterr().err
    assert asked == ["smollm2-135m", "smollm2-135m"]
