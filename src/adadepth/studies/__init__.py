"""Studies: each a spec (recipe -> arms -> runs -> results -> report, `shape`) that the one
runner (`runner.run_study`) runs, resumes and reports."""

from adadepth.studies.runner import run_study
from adadepth.studies.shape import StudyOptions

__all__ = ["StudyOptions", "run_study"]
