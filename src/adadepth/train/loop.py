"""The training loop shared by every training command.

It trains an *objective*: a module whose forward maps a batch (x, y) to a `StepOutput` (the loss
to minimise and extra metrics), with `lm_loss(x, y)` for evaluation and a pair of methods that
say which weights a checkpoint holds. Pretraining, routing and later methods differ only in their
objective; seeding, the schedule, checkpoints, resume and logging live here once.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from adadepth.config import OptimConfig, TrainConfig
from adadepth.data import TokenData
from adadepth.errors import UserError
from adadepth.flops import measured_peak_flops
from adadepth.train import checkpoint as ck
from adadepth.train import parallel
from adadepth.train.logging import MetricsLogger


@dataclass
class StepOutput:
    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    flops: float = 0.0  # FLOPs this step actually executed, for the utilisation figure


class Objective(Protocol):
    """What the loop trains. Optionally also `held_back(step) -> parameter names` (staged
    training: their gradients are dropped that step) and `may_skip_parameters` (DDP then
    looks for unused parameters)."""

    def __call__(self, x: Tensor, y: Tensor, step: int) -> StepOutput: ...
    def lm_loss(self, x: Tensor, y: Tensor) -> Tensor: ...
    def checkpoint_state(self) -> dict[str, Tensor]: ...
    def load_checkpoint_state(self, tensors: dict[str, Tensor]) -> None: ...
    def parameters(self) -> Any: ...
    def train(self, mode: bool = True) -> Any: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but no CUDA device is available")
    return parallel.init_from_env(device)  # under torchrun: cuda:LOCAL_RANK, process group


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig, device: torch.device):
    """AdamW, weight decay on matrices only; the fused kernel on CPU and CUDA.

    On the CPU torch's default is the per-parameter loop (a dozen kernels per tensor, 38 tensors
    in the `tiny` model); the fused kernel does each tensor's update in one pass, same math.
    """
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type in ("cuda", "cpu"))


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=enabled and device.type == "cuda")


@torch.no_grad()
def evaluate(lm_loss: Callable[[Tensor, Tensor], Tensor], data: TokenData, split: str,
             batch_size: int, block_size: int, device: torch.device,
             max_batches: int | None = None, amp: bool = True,
             par: parallel.Parallel | None = None) -> tuple[float, int]:
    """Mean LM loss (nats/token) over consecutive blocks of a split, and the tokens seen.

    With `par`, rank r takes batches r, r+N, ... and the sums are all-reduced.
    """
    rank, world = (par.rank, par.world) if par is not None else (0, 1)
    total, tokens, mine, count = 0.0, 0, 0, 0
    spare = None
    windows = data.eval_batches(split, batch_size, block_size, max_batches)
    # Shown only when evaluating takes a while (a large model's reference loss, say).
    shown = tqdm(windows, desc=f"evaluating ({split})", delay=2, leave=False, disable=None,
                 total=eval_batch_count(data, split, batch_size, block_size, max_batches))
    for i, (x, y) in enumerate(shown):
        count = i + 1
        spare = spare or (x, y)
        if i % world != rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast(device, amp):
            total += lm_loss(x, y).item() * y.numel()
        tokens += y.numel()
        mine += 1
    if par is not None and par.mode == "fsdp" and spare is not None:
        # Sharded forwards are collective: every rank runs as many, the extra ones discarded.
        for _ in range(-(-count // world) - mine):
            with autocast(device, amp):
                lm_loss(spare[0].to(device), spare[1].to(device))
    if par is not None:
        total, tokens = par.all_sum([total, float(tokens)])
        tokens = int(tokens)
    if tokens == 0:
        raise UserError(f"the {split} split is shorter than one block of {block_size} tokens")
    return total / tokens, tokens


def eval_batch_count(data: TokenData, split: str, batch_size: int, block_size: int,
                     max_batches: int | None) -> int:
    """How many batches `TokenData.eval_batches` yields."""
    windows = (len(data.split(split)) - 1) // block_size
    batches = -(-windows // batch_size)
    return batches if max_batches is None else min(batches, max_batches)


@dataclass
class LoopResult:
    step: int
    val_loss: float
    wall_s: float
    history: list[dict[str, Any]]


def train(objective: nn.Module, data: TokenData, train_cfg: TrainConfig, optim_cfg: OptimConfig,
          block_size: int, run_dir: Path, *, resume: bool = False, desc: str = "train",
          show_progress: bool = True) -> LoopResult:
    """Train `objective` for train_cfg.steps steps, checkpointing into run_dir.

    Under torchrun (or with train.parallel set) the steps run through `parallel`: the global
    batch train.batch_size is split over the processes, and only rank 0 logs and writes.
    """
    device = next(objective.parameters()).device
    amp = train_cfg.amp and device.type == "cuda"  # autocast runs the matmuls in bf16
    peak = measured_peak_flops(device.type, torch.bfloat16 if amp else torch.float32)
    generator = seed_everything(train_cfg.seed)
    if not any(p.requires_grad for p in objective.parameters()):
        raise UserError("nothing to train: every parameter is frozen")
    ckpt = ck.latest_checkpoint(run_dir) if resume else None
    state = ck.load_train_state(ckpt) if ckpt is not None else None
    sharded_ckpt = parallel.dcp_folder(ckpt) if ckpt is not None else None
    if ckpt is not None and sharded_ckpt is None:
        objective.load_checkpoint_state(ck.load_file(str(ckpt / ck.WEIGHTS)))
    par = parallel.setup(objective, train_cfg, device, run_dir)
    params = [p for p in par.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, optim_cfg, device)
    start_step, history, wall_before = 0, [], 0.0
    if ckpt is not None and state is not None:
        if sharded_ckpt is not None:
            par.load(sharded_ckpt, optimizer)
        else:
            if "optimizer" not in state:
                raise UserError(f"{ckpt} keeps its optimizer state in a {parallel.DCP_PREFIX}* "
                                "folder beside it, and that folder is missing")
            par.load_plain_optimizer(optimizer, state["optimizer"],
                                     lambda ps: make_optimizer(ps, optim_cfg, device))
        generator.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        start_step, history, wall_before = state["step"], state["history"], state["wall_s"]
    logger = MetricsLogger(run_dir, truncate_after=start_step) if par.main else None
    peak_total = sum(par.gather(peak))
    tokens_per_step = train_cfg.batch_size * block_size * train_cfg.grad_accum
    val_loss = history[-1]["val_loss"] if history and "val_loss" in history[-1] else math.nan
    bar = tqdm(total=train_cfg.steps, initial=start_step, desc=desc,
               disable=not (show_progress and par.main), dynamic_ncols=True, leave=False)
    clip = optim_cfg.grad_clip if optim_cfg.grad_clip > 0 else float("inf")
    pending: list[PendingStep] = []
    par.model.train()
    t_start = window_start = time.perf_counter()
    for step in range(start_step, train_cfg.steps):
        lr = lr_at(step, train_cfg.steps, optim_cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        metrics: dict[str, float | Tensor] = {}
        loss_sum: Tensor | float = 0.0
        flops = 0.0
        for micro in range(train_cfg.grad_accum):
            x, y = par.shard(*data.get_batch("train", train_cfg.batch_size, block_size,
                                             generator))
            with par.micro_step(sync=micro == train_cfg.grad_accum - 1):
                with autocast(device, train_cfg.amp):
                    out = par.model(to_device(x, device), to_device(y, device), step)
                if out.loss.requires_grad:  # e.g. all-full routing: no trainable module ran
                    (out.loss / train_cfg.grad_accum).backward()
            part = out.loss.detach()
            loss_sum = part if train_cfg.grad_accum == 1 else loss_sum + part / train_cfg.grad_accum
            flops += out.flops
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v / train_cfg.grad_accum
        held = getattr(objective, "held_back", None)
        if held is not None:  # staged training: parameters that sit this step out take no step
            names = held(step)
            for name, p in par.named_parameters():
                if name in names:
                    p.grad = None
        grad_norm = par.clip_grad_norm(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append(PendingStep(step + 1, lr, loss_sum, grad_norm, metrics, flops))
        bar.update(1)
        if len(pending) == step + 1 - start_step:  # the first log window: tokens/s from the
            # wall time alone (no figure read back), so a slow step shows its speed at once
            seconds = (time.perf_counter() - window_start) / len(pending)
            bar.set_postfix(tok_s=f"{tokens_per_step / seconds:.0f}", refresh=True)
        last = step + 1 == train_cfg.steps
        evaluating = (step + 1) % train_cfg.eval_interval == 0 or last
        saving = (step + 1) % train_cfg.ckpt_interval == 0 or last
        if not (evaluating or saving or (step + 1) % train_cfg.log_interval == 0):
            continue
        # Figures are read here, once per window, not per step: on a GPU each read is a sync.
        rows = window_figures(par, pending, time.perf_counter() - window_start,
                              tokens_per_step, peak_total)
        pending = []
        if evaluating:
            val_loss, _ = evaluate(par.lm_loss, data, "val", train_cfg.batch_size, block_size,
                                   device, train_cfg.eval_batches, train_cfg.amp, par=par)
            rows[-1]["val_loss"] = val_loss
            par.model.train()  # in case evaluation left a module in eval mode
        history.extend(rows)
        if logger is not None:
            for row in rows:
                if row["step"] % train_cfg.log_interval == 0 or "val_loss" in row or last:
                    logger.log(row)
        row = rows[-1]
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                        util=f"{row['utilisation']:.1%}", refresh=False)
        if saving:
            train_state = {
                "step": step + 1, "history": history, "data_rng": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "wall_s": wall_before + time.perf_counter() - t_start,
            }
            if device.type == "cuda":
                train_state["cuda_rng"] = torch.cuda.get_rng_state(device)
            if par.distributed:  # the optimizer goes into the sharded checkpoint
                train_state.update(world_size=par.world, parallel=par.mode)
                par.save(run_dir, step + 1, train_state, optimizer)
            else:
                train_state["optimizer"] = optimizer.state_dict()
                ck.save_checkpoint(run_dir, step + 1, objective.checkpoint_state(), train_state)
                parallel.remove_sharded(run_dir)  # a resumed distributed run's, now outdated
        window_start = time.perf_counter()  # evaluation and checkpoints are not training time
    bar.close()
    if logger is not None:
        logger.close()
    par.finish()
    return LoopResult(step=train_cfg.steps, val_loss=val_loss,
                      wall_s=wall_before + time.perf_counter() - t_start, history=history)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A batch onto the device; to a GPU through pinned memory, so the copy does not block."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class PendingStep:
    """A trained step whose figures may still be tensors on the device."""

    step: int
    lr: float
    loss: Tensor | float
    grad_norm: Tensor | float
    metrics: dict[str, float | Tensor]
    flops: float


def read_values(values: list[Any]) -> list[float]:
    """Floats of a list of floats and 0-d tensors, with one transfer for all the tensors."""
    tensors = [v.detach().float().reshape(()) for v in values if isinstance(v, Tensor)]
    read = iter(torch.stack(tensors).tolist() if tensors else [])
    return [next(read) if isinstance(v, Tensor) else float(v) for v in values]


def window_figures(par: parallel.Parallel, steps: list[PendingStep], seconds: float,
                   tokens_per_step: int, peak_total: float) -> list[dict[str, Any]]:
    """The history rows of a window of steps that took `seconds` of wall time in all.

    Loss and metrics are averaged over ranks (equal slices: the global-batch mean); throughput
    is per rank and in total (the slowest rank sets the pace), FLOPs utilisation of all devices.
    Wall time per step is the window's mean, and includes everything the loop does between two
    steps (batching, the progress bar, reading these figures) except evaluation and
    checkpoints, which fall between windows. One gather across ranks per window.
    """
    keys = [list(s.metrics) for s in steps]
    flat = read_values([v for s, k in zip(steps, keys, strict=True)
                        for v in (s.loss, s.grad_norm, *(s.metrics[name] for name in k))])
    mine = {"values": flat, "flops": [s.flops for s in steps], "dt": seconds / len(steps)}
    ranks = par.gather(mine)
    dt_max = max(r["dt"] for r in ranks)
    rows: list[dict[str, Any]] = []
    at = 0
    for i, (s, names) in enumerate(zip(steps, keys, strict=True)):
        width = 2 + len(names)
        per_rank = [r["values"][at:at + width] for r in ranks]
        at += width
        flops_total = sum(r["flops"][i] for r in ranks)
        row: dict[str, Any] = {
            "step": s.step, "loss": sum(v[0] for v in per_rank) / par.world, "lr": s.lr,
            "grad_norm": per_rank[0][1],  # the norm of the whole (all-reduced) gradient
            "tokens_per_s": tokens_per_step / dt_max, "flops_per_s": flops_total / dt_max,
            "utilisation": flops_total / dt_max / peak_total,
            "flops": flops_total}  # executed this step, all ranks
        if par.world > 1:
            row["tokens_per_s_rank"] = [tokens_per_step / par.world / r["dt"] for r in ranks]
        for j, name in enumerate(names):
            row[name] = sum(v[2 + j] for v in per_rank) / par.world
        rows.append(row)
    return rows
