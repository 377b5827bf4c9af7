"""Scale-out on PyTorch's own engine: torchrun process groups, DDP, FSDP2, distributed checkpoints.

The model and the objectives know nothing of this module (as in torchtitan): `train()` asks
`setup()` for a `Parallel` plan and runs every step through it.

- Process group: from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), NCCL on GPU and
  gloo on CPU; each rank computes on cuda:LOCAL_RANK. Without torchrun there is no process group
  unless `train.parallel` asks for one (then a group of one process, so the same code runs).
  Ranks other than 0 print nothing on stdout (every rank holds the same results).
- Data: `train.batch_size` is the *global* batch. Every rank draws the same global batch from the
  shared generator and keeps its slice, so N processes take exactly the gradient of one.
- `ddp`: DistributedDataParallel around the objective. DDP only registers parameters that
  require grad, so a frozen backbone is never all-reduced (parallel.json records the reducer).
- `fsdp`: FSDP2 `fully_shard` per block, then the root, on a replica of the objective; the
  caller's objective stays a plain module and receives the trained weights at each checkpoint
  and at the end, so code after `train()` (calibration, evaluation) needs no change. Modules
  inside a block that are also reachable from outside it (a routed FFN listed in
  `RoutedModel.routers`) become their own FSDP unit first; frozen and trainable parameters may
  share a unit (FSDP2 reduces only the gradients that exist). bf16 parameters with fp32
  gradient reduction on GPU when `train.amp`.
- Checkpoints: `dcp-<step>/` beside `ckpt-<step>/` holds the trainable weights and the optimizer
  through torch.distributed.checkpoint (resumable at any world size, also in one plain process);
  `ckpt-<step>/model.safetensors` stays the consolidated single file every loader reads.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import inspect
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.utils.checkpoint
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from adadepth.config import TrainConfig
from adadepth.errors import UserError
from adadepth.train import checkpoint as ck

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DCP_PREFIX = "dcp-"
PLAN_FILE = "parallel.json"
# Frozen weights (a routed run's backbone) come from elsewhere; checkpoints hold what trains.
DCP_OPTIONS = StateDictOptions(ignore_frozen_params=True)
FULL_OPTIONS = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
# Not strict: the frozen weights are absent by design. dcp.load has already refused a checkpoint
# that lacks any tensor asked for, i.e. any trainable weight.
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


# -- process group ---------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the one process that writes files and talks to the user."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_from_env(device: torch.device) -> torch.device:
    """Under torchrun: join the process group and return this rank's device; else a no-op."""
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(_backend(device),
                                device_id=device if device.type == "cuda" else None)
        atexit.register(_teardown)
        if rank() != 0:
            # Every rank computes the same results; one copy on stdout, not N interleaved ones
            # (as torchvision's reference scripts do). Errors still reach stderr from any rank.
            sys.stdout = open(os.devnull, "w")  # lives as long as the process
    return device


def _init_single(device: torch.device) -> None:
    """A process group of one, so `--parallel` without torchrun runs the same code path."""
    dist.init_process_group(_backend(device), store=dist.HashStore(), rank=0, world_size=1)
    atexit.register(_teardown)


# -- where the layer stack is ----------------------------------------------------------------------
def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: a `blocks` ModuleList (our Transformer), else the ModuleList whose
    length is the `n_layers` of the layer-stack interface (adapters of other models)."""
    for module in model.modules():
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return list(blocks)
    for module in model.modules():
        n = getattr(module, "n_layers", None)
        if isinstance(n, int) and n > 0:
            for child in module.modules():
                if isinstance(child, nn.ModuleList) and len(child) == n:
                    return list(child)
    raise UserError(f"{type(model).__name__} has no layer stack (a `blocks` list, or `n_layers` "
                    "and a list of that many layers) for FSDP or activation checkpointing")


def shared_units(root: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """Modules inside a block that are also reachable from the root without entering a block.

    FSDP must see them as units of their own, or the root would claim their (already sharded)
    parameters a second time.
    """
    block_set = set(blocks)
    inside = {m for b in blocks for m in b.modules()} - block_set
    found: list[nn.Module] = []
    seen: set[nn.Module] = set()

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if child in block_set or child in seen:
                continue
            seen.add(child)
            if child in inside:
                found.append(child)
            else:
                walk(child)

    walk(root)
    return found


def checkpoint_activations(model: nn.Module) -> Callable[[], None]:
    """Recompute each block's activations in backward; returns the undo.

    An instance-level forward keeps the module tree (and so every state-dict key) unchanged.
    """
    blocks = find_blocks(model)
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)

    def undo() -> None:
        for block in blocks:
            vars(block).pop("forward", None)
    return undo


def compile_in_place(module: nn.Module) -> Callable[[], None]:
    """torch.compile the module's calls (inductor), keeping the module itself, so parameter
    names and state-dict keys do not change; returns the undo. The first steps pay for
    compiling (10 to 20 s for the `tiny` model on 2 CPU cores)."""
    module.compile()

    def undo() -> None:
        module._compiled_call_impl = None
    return undo


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _ddp(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    kwargs: dict[str, Any] = {"device_ids": [device.index] if device.type == "cuda" else None,
                              # An objective whose trainable modules may sit out a step (a
                              # constant routing gate) says so; DDP then waits for none of them.
                              "find_unused_parameters": bool(
                                  getattr(module, "may_skip_parameters", False))}
    # Buffers are identical on every rank by construction: no broadcast before each forward.
    sync_key = ("forward_sync_buffers" if "forward_sync_buffers" in
                inspect.signature(DistributedDataParallel.__init__).parameters
                else "broadcast_buffers")
    kwargs[sync_key] = False
    return DistributedDataParallel(module, **kwargs)


def _fully_shard(model: nn.Module, device: torch.device, amp: bool) -> int:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mesh = init_device_mesh(device.type, (world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if amp and device.type == "cuda" else MixedPrecisionPolicy())
    # Every rank must shard the same weights: rank 0's, whatever each rank initialised.
    with torch.no_grad():
        for tensor in model.state_dict(keep_vars=True).values():
            dist.broadcast(tensor.data, src=0)
    blocks = find_blocks(model)
    units = [*shared_units(model, blocks), *blocks]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "lm_loss")  # evaluation enters through lm_loss
    return len(units) + 1


# -- the plan train() follows ----------------------------------------------------------------------
@dataclass
class Parallel:
    mode: str  # none | ddp | fsdp
    objective: nn.Module  # the caller's plain module; holds the trained weights when done
    model: nn.Module  # what a training step calls: the objective, DDP(objective) or a replica
    device: torch.device
    rank: int = 0
    world: int = 1
    home: torch.device | None = None  # fsdp on GPU: the caller's copy waits on the CPU
    undo: list[Callable[[], None]] = field(default_factory=list)

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def lm_loss(self, x: Tensor, y: Tensor) -> Tensor:
        inner = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        return inner.lm_loss(x, y)

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's slice of the global batch."""
        if self.world == 1:
            return x, y
        n = x.shape[0] // self.world
        part = slice(self.rank * n, (self.rank + 1) * n)
        return x[part], y[part]

    @contextlib.contextmanager
    def micro_step(self, sync: bool) -> Iterator[None]:
        """Gradient accumulation: reduce gradients only on the last micro-step."""
        if self.mode == "ddp" and not sync:
            with self.model.no_sync():
                yield
            return
        if self.mode == "fsdp":
            self.model.set_requires_gradient_sync(sync)
        yield

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The trained parameters under the names they have in the caller's objective."""
        inner = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        return inner.named_parameters()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> Tensor:
        """Clip and return the total norm as a tensor (read it when convenient: a GPU sync)."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)  # sharded gradients give a DTensor norm
        return full() if full is not None else norm

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # -- weights and checkpoints ---------------------------------------------------------------
    def pull(self) -> None:
        """Copy the trained weights from the sharded replica into the caller's objective."""
        if self.mode != "fsdp":
            return
        full = get_model_state_dict(self.model, options=FULL_OPTIONS)
        _, unexpected = self.objective.load_state_dict(full, strict=False)
        if unexpected:
            raise RuntimeError(f"FSDP replica keys unknown to the objective: {unexpected[:3]}")

    def save(self, run_dir: Path, step: int, train_state: dict[str, Any],
             optimizer: torch.optim.Optimizer) -> None:
        """Collective: `dcp-<step>/` (sharded) and then `ckpt-<step>/` (single file), atomically."""
        self.pull()
        weights = self.objective.checkpoint_state() if self.main else {}
        final, tmp = run_dir / dcp_name(step), run_dir / f".tmp-{dcp_name(step)}"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = get_state_dict(self.model, optimizer, options=DCP_OPTIONS)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        barrier()
        if self.main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            ck.save_checkpoint(run_dir, step, weights, train_state)  # moves LATEST
            remove_sharded(run_dir, keep=final)
        barrier()

    def load(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        """Resume weights and optimizer from a DCP folder written at any world size."""
        model_sd, optim_sd = get_state_dict(self.model, optimizer, options=DCP_OPTIONS)
        state = {"model": model_sd, "optim": optim_sd}
        with warnings.catch_warnings():  # one plain process is what we mean: no warning
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        set_state_dict(self.model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=LOAD_OPTIONS)

    def load_plain_optimizer(self, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                             make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
        """Resume the optimizer of a one-process checkpoint (weights are already loaded)."""
        if self.mode != "fsdp":
            optimizer.load_state_dict(state)
            return
        # Through a plain optimizer on the caller's objective, then re-sharded by name.
        plain = make([p for p in self.objective.parameters() if p.requires_grad])
        plain.load_state_dict(state)
        full = get_optimizer_state_dict(self.objective, plain, options=FULL_OPTIONS)
        set_optimizer_state_dict(self.model, optimizer, full, options=FULL_OPTIONS)

    def finish(self) -> None:
        """Leave the caller's objective plain, complete and on its device."""
        self.pull()
        if self.home is not None:
            self.objective.to(self.home)
        for undo in self.undo:
            undo()


def remove_sharded(run_dir: Path, keep: Path | None = None) -> None:
    """Delete DCP folders other than `keep` (call once the checkpoint they back is replaced)."""
    for old in run_dir.glob(f"{DCP_PREFIX}*"):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def dcp_name(step: int) -> str:
    return f"{DCP_PREFIX}{step:07d}"


def dcp_folder(ckpt: Path) -> Path | None:
    """The DCP folder written with checkpoint `ckpt-<step>`, if any."""
    path = ckpt.parent / (DCP_PREFIX + ckpt.name.removeprefix("ckpt-"))
    return path if (path / ".metadata").is_file() else None


def setup(objective: nn.Module, cfg: TrainConfig, device: torch.device,
          run_dir: Path) -> Parallel:
    """Wrap the objective as `cfg.parallel` says (DDP when torchrun started several processes)."""
    mode = cfg.parallel
    if mode == "none" and world_size() > 1:
        mode = "ddp"  # N identical unsynchronised runs would only waste N-1 machines
    if mode != "none" and not dist.is_initialized():
        _init_single(device)
    par = Parallel(mode, objective, objective, device, rank(), world_size())
    if cfg.batch_size % par.world:
        raise UserError(f"train.batch_size {cfg.batch_size} (the global batch) does not split "
                        f"evenly over {par.world} processes")
    if mode == "fsdp":
        par.model = copy.deepcopy(objective)
        if cfg.activation_checkpointing:
            checkpoint_activations(par.model)
        units = _fully_shard(par.model, device, cfg.amp)
        if device.type == "cuda":  # only the shards stay on the GPU while training
            objective.to("cpu")
            par.home = device
    else:
        if cfg.activation_checkpointing:
            par.undo.append(checkpoint_activations(objective))
        if mode == "ddp":
            par.model = _ddp(objective, device)
    if cfg.compile:
        par.undo.append(compile_in_place(par.model))
    if par.main and mode == "none":
        (run_dir / PLAN_FILE).unlink(missing_ok=True)  # from an earlier, distributed segment
    elif par.main:
        plan: dict[str, Any] = {
            "mode": mode, "world_size": par.world, "backend": dist.get_backend(),
            "device": str(device), "global_batch": cfg.batch_size,
            "batch_per_rank": cfg.batch_size // par.world,
            "activation_checkpointing": cfg.activation_checkpointing,
            "trainable_tensors": sum(p.requires_grad for p in objective.parameters()),
            "trainable_parameters": sum(p.numel() for p in objective.parameters()
                                        if p.requires_grad),
            "frozen_parameters": sum(p.numel() for p in objective.parameters()
                                     if not p.requires_grad),
        }
        if mode == "ddp":
            # What the reducer actually all-reduces (a prototype API: absent, nothing recorded).
            logging_data = getattr(par.model, "_get_ddp_logging_data", dict)()
            plan["ddp_reducer"] = {k: logging_data.get(k) for k in (
                "num_parameter_tensors", "total_parameter_size_bytes", "bucket_sizes")}
        else:
            plan["fsdp"] = {"units": units, "mixed_precision": "bf16 params, fp32 reduce"
                            if cfg.amp and device.type == "cuda" else "off"}
        run_dir.mkdir(parents=True, exist_ok=True)
        ck.write_json_atomic(run_dir / PLAN_FILE, plan)
    return par


# -- conversion ------------------------------------------------------------------------------------
def dcp_to_safetensors(dcp_dir: str | Path, out: str | Path, prefix: str = "model.") -> Path:
    """Consolidate the weights of a DCP folder into one safetensors file, in one process.

    DCP names tensors by their place in the objective; the keys under `prefix` (the objective's
    model) are written with the prefix removed, which is the layout of `ckpt-<step>/
    model.safetensors` for dense and routed runs. Training writes that file beside every DCP
    folder already; this is for folders that lost it or came from elsewhere.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_dir, out = Path(dcp_dir), Path(out)
    if not (dcp_dir / ".metadata").is_file():
        raise UserError(f"{dcp_dir} is not a torch.distributed.checkpoint folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.pt")
    try:
        dcp_to_torch_save(dcp_dir, tmp)
        state = torch.load(tmp, weights_only=True)["model"]
    finally:
        tmp.unlink(missing_ok=True)
    # Clones: safetensors refuses tensors that share storage (tied or aliased modules).
    tensors = {k.removeprefix(prefix): v.detach().contiguous().clone()
               for k, v in state.items() if isinstance(v, Tensor) and k.startswith(prefix)}
    if not tensors:
        raise UserError(f"{dcp_dir} holds no weights under {prefix!r}")
    ck_tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(ck_tmp))
    os.replace(ck_tmp, out)
    return out
