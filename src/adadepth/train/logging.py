"""Metrics to a JSONL file (one object per logged step) and to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adadepth.train.checkpoint import write_text_atomic


class MetricsLogger:
    def __init__(self, run_dir: Path, truncate_after: int = 0, tensorboard: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        # On resume, drop rows written after the checkpoint we restart from: they will be redone.
        kept = []
        if self.path.exists() and truncate_after > 0:
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= truncate_after]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=truncate_after + 1)

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
