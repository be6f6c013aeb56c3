"""Several processes, one run: torchrun's environment, DDP or FSDP2, and each rank's share of a batch.

`torchrun --nproc_per_node N -m earful train ...` starts N ranks (gloo on CPU, nccl on CUDA; the
usual `--nnodes/--rdzv-*` flags for several machines). Every rank walks the same global batches
and takes every N-th clip of each (`micro_step`), so the loss curve is the one-process run's with
the same global batch. `train.parallel` picks how the model is spread:

- `ddp`: each rank holds the whole model; DDP averages gradients.
- `fsdp`: FSDP2 (`fully_shard`): every transformer block (the classes a transformers model lists
  in `_no_split_modules`) is one shard group, the rest of the model another; each rank stores 1/N
  of every parameter, gradient and optimizer state, and gathers a block only while it runs.

Either way the model's training loss is the forward of a small wrapper (`LossModule`), so the
hooks DDP and FSDP hang on `forward` see every step.
"""

from __future__ import annotations

import logging
import os

import torch

from ..errors import EarfulError

logger = logging.getLogger(__name__)

MODES = ("ddp", "fsdp")


def init_distributed() -> tuple[int, int]:
    """(rank, world size): torchrun's environment, gloo on CPU and nccl on CUDA; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    logger.info("distributed: rank %d of %d (%s)", dist.get_rank(), world, dist.get_backend())
    return dist.get_rank(), world


def barrier() -> None:
    """Wait for every rank; nothing to wait for in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish_distributed() -> None:
    import torch.distributed as dist

    barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class LossModule(torch.nn.Module):
    """forward(batch) = the model's training loss: what DDP or FSDP wraps."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def transformer_blocks(model: torch.nn.Module) -> tuple[list[torch.nn.Module], set[str]]:
    """The transformer blocks in `model` (the classes each transformers part lists in
    `_no_split_modules`), and those class names."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names], names


def wrap(model: torch.nn.Module, loss_fn, mode: str, device: torch.device) -> torch.nn.Module:
    """The runner for `mode` around `model`; FSDP shards `model` in place (build the optimizer after)."""
    runner = LossModule(model, loss_fn)
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(runner)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import torch.distributed as dist

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks, names = transformer_blocks(model)
    if not blocks:
        raise EarfulError("train.parallel=fsdp: the model lists no transformer blocks (_no_split_modules) to shard")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(runner, mesh=mesh)  # embeddings, projector, norms, output layer: one more group
    logger.info("FSDP2: %d blocks (%s) + the rest, sharded over %d ranks", len(blocks), ", ".join(sorted(names)), mesh.size())
    return runner


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile each transformer block in place (dynamic shapes: batches vary in length); the
    count. Blocks compile on their first call, so a cached frozen encoder's never do."""
    blocks, names = transformer_blocks(model)
    for block in blocks:
        block.compile(dynamic=True)
    logger.info("torch.compile: %d blocks (%s)", len(blocks), ", ".join(sorted(names)))
    return len(blocks)


def micro_step(runner, batcher, idx: list[int], rank: int, world: int, amp, scale: float = 1.0,
               token_weights=None) -> tuple[float, float | None]:
    """One micro-batch over the ranks: this rank's share of `idx`, weighted so that the averaged
    gradient is that of `scale` times the whole micro-batch's mean loss, as on one process (which
    backpropagates mean / grad_accum per micro-batch: pass scale=1/grad_accum). The mean is over
    labelled tokens, weighted by `token_weights` (train.loss_weights) when given, or over pairs
    for DPO (`losses.batch_weight`). Returns (the whole micro-batch's mean loss, unscaled; the
    loss's companion figure, e.g. DPO's reward margin, or None)."""
    import torch.distributed as dist

    from .losses import batch_weight

    mine, weight = idx[rank::world], 1.0
    if not mine:  # fewer clips than ranks: run one with no weight, so every rank steps together
        mine, weight = idx[:1], 0.0
    batch = batcher(mine)
    n_mine = batch_weight(batch, token_weights) * weight
    dev = _device_of(batch)  # nccl reduces CUDA tensors, gloo CPU ones
    counts = torch.tensor([n_mine], dtype=torch.float64, device=dev)
    dist.all_reduce(counts)
    n_all = float(counts[0])
    with amp:
        out = runner(batch)
    mean, aux = out if isinstance(out, tuple) else (out, None)
    # DDP and FSDP average over ranks, so each rank's share counts n_mine * world / n_all: the
    # average is then the sum over all ranks' weighted losses / n_all, the whole micro-batch's mean.
    (mean * (scale * n_mine * world / n_all)).backward()
    total = torch.tensor([float(mean.detach()) * n_mine, float(aux if aux is not None else 0.0) * n_mine], dtype=torch.float64, device=dev)
    dist.all_reduce(total)
    return float(total[0]) / n_all, (float(total[1]) / n_all if aux is not None else None)


def _device_of(batch: dict) -> torch.device:
    return batch["chosen"]["labels"].device if "chosen" in batch else batch["labels"].device


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters gathered whole on rank 0's CPU (empty on the other ranks); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of parameters, of the trained ones (their gradients take as much at each
    step), and of optimizer state; an FSDP shard counts its local part."""

    def local(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    return {"parameters": sum(local(p) for p in params),
            "trained_parameters": sum(local(p) for p in params if p.requires_grad),
            "optimizer_state": sum(local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))}
