"""torch.distributed set-up: data parallelism over all ranks, expert parallelism over groups.

`hyperrouter train|finetune|compare` call `init_from_env` first. Without torchrun's environment
(RANK / WORLD_SIZE / LOCAL_RANK) it returns a single-process `DistContext` and nothing else
happens. Under `torchrun --nproc_per_node N -m hyperrouter ...` it initialises the default
process group (nccl on CUDA, gloo on CPU) with a collective timeout, picks the rank's device, and
lays the W ranks out as a 2-D mesh dp x ep (`torch.distributed.device_mesh`): ranks
[i * ep, (i + 1) * ep) form expert-parallel group i (the experts of every MoE layer are spread
over it), and ranks holding the same experts form an expert-data-parallel group.

Every rank processes different tokens, so the world is the data-parallel group of the non-expert
parameters (`average_gradients`, one flat all-reduce per step), and the expert parameters of a
shard are averaged over
their expert-data-parallel group (`hyperrouter.moe.expert_parallel`).

`current()` returns the context of this process (single-process until `init_from_env` ran).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import distributed as dist

from hyperrouter.errors import HyperRouterError

DEFAULT_TIMEOUT_S = 300.0
T = TypeVar("T")


@dataclass
class DistContext:
    """Where this process stands: rank / world size, its device and its groups (None when
    single-process). `ep_size` ranks share the experts of every MoE layer."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    ep_size: int = 1
    ep_group: Any = None
    expert_dp_group: Any = None
    mesh: Any = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CURRENT = DistContext()


def current() -> DistContext:
    return _CURRENT


def under_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise HyperRouterError(
            f"environment variable {name}={os.environ[name]!r} is not an integer"
        ) from None


def init_from_env(
    device: str = "auto", *, expert_parallel: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S
) -> DistContext:
    """Initialise torch.distributed from torchrun's environment (once); single-process without
    it. `device` is the run's train.device (auto | cpu | cuda | cuda:N: under torchrun each rank
    takes cuda:LOCAL_RANK); `expert_parallel` is the size of the expert-parallel groups."""
    global _CURRENT
    if (
        isinstance(expert_parallel, bool)
        or not isinstance(expert_parallel, int)
        or expert_parallel < 1
    ):
        raise HyperRouterError(
            f"--expert-parallel must be an integer >= 1, got {expert_parallel!r}"
        )
    if not timeout_s > 0:
        raise HyperRouterError(f"--dist-timeout must be > 0 seconds, got {timeout_s!r}")
    if _CURRENT.enabled:
        return _CURRENT
    if not under_torchrun():
        if expert_parallel != 1:
            raise HyperRouterError(
                f"--expert-parallel {expert_parallel} needs {expert_parallel} or a multiple of "
                f"processes: launch with torchrun --nproc_per_node N"
            )
        _CURRENT = DistContext()
        return _CURRENT
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    problem = None
    if world % expert_parallel:
        problem = (
            f"--expert-parallel {expert_parallel} does not divide the world size {world} "
            f"(torchrun's nproc_per_node x nnodes)"
        )
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        problem = problem or f"train.device={device!r} but CUDA is not available"
    elif use_cuda and local >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        problem = problem or (
            f"LOCAL_RANK {local} needs GPU {local}, but this machine has {count}: use "
            f"--nproc_per_node {count} or fewer"
        )
    if problem is not None:
        use_cuda = False  # a CPU group, only so that every rank reports before any exits
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    if problem is not None:
        _CURRENT = DistContext(rank=rank, world_size=world, local_rank=local, device=dev)
        raise HyperRouterError(problem)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, device=dev)
    ctx.ep_size = expert_parallel
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        dp = world // expert_parallel
        ctx.mesh = init_device_mesh(dev.type, (dp, expert_parallel), mesh_dim_names=("dp", "ep"))
        ctx.ep_group = ctx.mesh.get_group("ep")
        ctx.expert_dp_group = ctx.mesh.get_group("dp")
    _CURRENT = ctx
    return ctx


def shutdown() -> None:
    """Destroy the process group (when this module created one) and return to single-process."""
    global _CURRENT
    if _CURRENT.enabled and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = DistContext()


def all_reduce_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum `tensor` over the ranks of `group` (the world by default) in place; no-op when
    single-process. Returns the tensor."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def broadcast_parameters(params: list[torch.Tensor], group: Any = None) -> None:
    """Give every rank rank 0's values of `params` (at the start of a run: the replicas begin
    equal, whatever each rank's random state did while building its model)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=dist.get_global_rank(group, 0) if group else 0, group=group)


def average_gradients(params: list[torch.nn.Parameter], group: Any = None) -> None:
    """After the step's backwards: every rank's gradients summed over `group` (the world by
    default) and divided by its size, in one flat all-reduce per dtype. The update then equals
    one process's on the global batch (the mean of the ranks' losses), bit for bit on 2 ranks:
    (a + b) / 2 == a / 2 + b / 2 in floating point.

    A parameter that got no gradient on any rank keeps None, as in one process (the optimizer
    skips it); one with a gradient on some rank gets zeros where it had none. This is what
    DistributedDataParallel with find_unused_parameters does, without its per-step search of the
    autograd graph (routers leave parameters unused at some k: aux_free's gate at k = 1, RL-R's
    baseline, adaptive-softmax clusters with no target in the batch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    size = dist.get_world_size(group)
    if size == 1 or not params:
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, device), ps in by_dtype.items():
        parts = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in ps]
        present = torch.tensor([p.grad is not None for p in ps], dtype=dtype, device=device)
        flat = torch.cat([*parts, present])
        dist.all_reduce(flat, group=group)
        counts = flat[-len(ps) :].tolist()
        offset = 0
        for p, count in zip(ps, counts):
            n = p.numel()
            if count > 0:
                grad = flat[offset : offset + n].view_as(p).div_(size)
                if p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.copy_(grad)
            offset += n


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give its result (or its HyperRouterError / OSError, as the
    same one-line HyperRouterError) to every rank: file-system checks and reads made once, so
    that every rank agrees, also across machines without a shared file system. Single-process:
    just `fn()`."""
    ctx = _CURRENT
    if not ctx.enabled:
        return fn()
    payload: list[Any] = [None]
    if ctx.is_main:
        try:
            payload[0] = ("ok", fn())
        except HyperRouterError as err:
            payload[0] = ("error", str(err))
        except OSError as err:
            cause = err.strerror or str(err)
            payload[0] = ("error", f"{err.filename}: {cause}" if err.filename else cause)
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise HyperRouterError(value)
    return value


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] when single-process)."""
    if not _CURRENT.enabled:
        return [obj]
    out: list[Any] = [None] * _CURRENT.world_size
    dist.all_gather_object(out, obj)
    return out


def all_gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 1 in rank order (the same shape on every rank
    but dim 1, which may differ): Transformer-XL memories [mem_len, batch, d] of all columns."""
    ctx = _CURRENT
    if not ctx.enabled:
        return tensor
    sizes = all_gather_objects(tuple(tensor.shape))
    width = max(s[1] for s in sizes)
    padded = torch.zeros(
        *tensor.shape[:1], width, *tensor.shape[2:], dtype=tensor.dtype, device=tensor.device
    )
    padded[:, : tensor.shape[1]] = tensor
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:, : s[1]] for p, s in zip(parts, sizes)], dim=1)


def settle(timeout_s: float = 10.0) -> None:
    """Before a rank exits on a user error: wait (at most `timeout_s`) until every rank got there,
    so that torchrun, which stops all ranks as soon as one exits, does not cut off the others'
    own one-line errors. gloo only (its monitored barrier has a timeout); any failure is ignored:
    the rank is about to exit anyway."""
    ctx = _CURRENT
    if not ctx.enabled or not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError:
        pass
