"""Process groups, devices and model wrapping for training: plain single-process on CPU or one GPU, FSDP2
`fully_shard` under torchrun. Everything distributed lives here (STYLE rule 7), not in the model files."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mm_llama.devices import resolve_device


@dataclass
class Runtime:
    """Where this process trains: its rank in the job and its device."""

    rank: int
    world_size: int
    device: torch.device
    distributed: bool  # launched by torchrun (FSDP2 even with one process, so numerics match across sizes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Sum a few floats over ranks (fp64, so token counts and loss sums stay exact)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.all_sum([float(flag)])[0] > 0

    def all_max(self, value: int) -> int:
        """The largest of one integer over ranks."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_runtime(device: str = "auto") -> Runtime:
    """Join the torchrun job when there is one (RANK/WORLD_SIZE set), else run as a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available() and device != "cpu":
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda"
                                    else None)
        return Runtime(dist.get_rank(), dist.get_world_size(), dev, True)
    return Runtime(0, 1, resolve_device(device, "train.device"), False)


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def prepare_model(model: nn.Module, blocks: Sequence[nn.Module], runtime: Runtime, *, bf16: bool,
                  checkpointed: Sequence[nn.Module] = (), compile: bool, cpu_offload: bool) -> None:
    """Activation checkpointing, torch.compile and FSDP2, applied in place per block (torchtitan's order) so that
    parameter names never change.

    Under torchrun every block and then the root are `fully_shard`ed: parameters stay fp32 (the master copy) and are
    gathered in bf16 for compute, gradients are reduced in fp32. Frozen and trainable parameters may be mixed.
    """
    from torch.distributed._composable import checkpoint

    recompute = {id(block) for block in checkpointed}  # activation checkpointing: a subset of `blocks`
    for block in blocks:
        if id(block) in recompute:
            checkpoint(block)
        if compile:
            block.compile()
    if not runtime.distributed:
        return
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mp_policy=mp, offload_policy=offload)
