"""Creating the Accelerator the same way under every launcher, and catching silent launcher mismatches.

Facts this relies on (measured with torch 2.13, accelerate 1.15, deepspeed 0.19): on a machine
without CUDA, plain multi-process runs only form one gloo job when the Accelerator is created with
cpu=True; DeepSpeed instead needs the gloo backend named through InitProcessGroupKwargs (it refuses
cpu=True); ACCELERATE_USE_CPU together with DeepSpeed silently runs plain DDP;
`accelerate launch --cpu` starts one process whatever --num_processes says.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from minimind_scale.errors import PeerLost, RunFailed, UserError


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process, read before any process group exists."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_environ(cls) -> LaunchEnv:
        return cls(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                   world_size=int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(dtype: str) -> str:
    """Accelerate's mixed_precision value for our dtype field."""
    cuda = torch.cuda.is_available()
    if dtype == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "no"
    check_fp16_available(dtype)
    return {"fp32": "no"}.get(dtype, dtype)


def check_fp16_available(dtype: str) -> None:
    if dtype == "fp16" and not torch.cuda.is_available():
        raise UserError("dtype fp16 needs a GPU; on a CPU use bf16 or fp32")


def check_group_size(accelerator, world_size: int) -> None:
    """Each of these launcher mistakes otherwise runs N independent copies, or one process, silently."""
    if accelerator.num_processes != world_size:
        raise UserError(
            f"the launcher started {world_size} process(es) but they formed a group of {accelerator.num_processes}. "
            "On a machine without GPUs use `accelerate launch --multi_gpu --num_processes N` (not --cpu, which "
            "starts one process) or `torchrun --nproc_per_node N`.")


def reduce_sum(accelerator, values: list) -> list[float]:
    """Each value summed over all processes (float64, so token counts stay exact)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist() if accelerator.num_processes > 1 else t.tolist()


def load_deepspeed_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"DeepSpeed config not found: {path}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "swanlab": "swanlab"}


def check_tracker(report_to: str) -> None:
    """accelerate drops a tracker whose package is missing with only a debug log, so nothing would be recorded."""
    if report_to == "none":
        return
    import importlib.util

    package = TRACKER_PACKAGES[report_to]
    if importlib.util.find_spec(package) is None:
        raise UserError(f"report_to {report_to}: the '{package}' package is not installed (pip install {package})")


def requested_process_count_from_launcher() -> int | None:
    """--num_processes as typed to `accelerate launch`, read from the parent's command line (Linux).

    `accelerate launch --cpu --num_processes N` starts one process and tells it nothing about N, so
    the launcher's own arguments are the only place the mismatch shows.
    """
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any("accelerate" in a for a in args[:3]):
        return None
    for i, a in enumerate(args):
        key, eq, val = a.partition("=")
        if key in ("--num_processes", "--num-processes"):
            val = val if eq else (args[i + 1] if i + 1 < len(args) else "")
            return int(val) if val.isdigit() else None
    return None


def check_launcher(env: LaunchEnv) -> None:
    if env.world_size == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        asked = requested_process_count_from_launcher()
        if asked and asked > 1:
            raise UserError(f"`accelerate launch --cpu --num_processes {asked}` starts ONE process. For {asked} CPU "
                            f"processes use `accelerate launch --multi_gpu --num_processes {asked} -m minimind_scale "
                            f"...` (or accelerate_configs/cpu.yaml, or `torchrun --nproc_per_node {asked}`).")


# How a collective reports that another rank is gone: gloo sees the socket close, NCCL aborts the
# communicator or its watchdog times out.
PEER_FAILURE_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                      "communicator was aborted", "Watchdog caught collective operation timeout", "timed out",
                      "Timed out")


@contextlib.contextmanager
def peer_failures_as_errors(world_size: int, newest_checkpoint):
    """Turn a collective that failed because another process died into one readable PeerLost error.

    `newest_checkpoint()` names the checkpoint a rerun would resume from (called only on failure)."""
    try:
        yield
    except RuntimeError as e:
        dist_error = isinstance(e, getattr(torch.distributed, "DistError", ()))
        if world_size < 2 or isinstance(e, RunFailed) or not (
                dist_error or any(s in str(e) for s in PEER_FAILURE_SIGNS)):
            raise
        # First sentence of the first line, without gloo's "[source file:line]" prefix.
        first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [""])[0])
        cause = first.split(". ")[0][:200] or type(e).__name__
        saved = newest_checkpoint()
        raise PeerLost(f"another process of this {world_size}-process run stopped or became unreachable ({cause}). "
                       "Its own log says why. " + (f"The newest complete checkpoint is {saved}; run the same command "
                                                   "again to resume from it." if saved
                                                   else "No checkpoint was saved yet.")
                       ) from None


@contextlib.contextmanager
def whole_model_construction(accelerator):
    """Build models whole, never under DeepSpeed's zero.Init.

    transformers builds every model under zero.Init while a ZeRO-3 config is registered with it (and
    accelerate always registers one). prepare() partitions the trained model afterwards instead: at
    MiniMind sizes (≤ 200M) that costs little, keeps the initial weights identical on every backend,
    and leaves inference-only models (DPO reference, distillation teacher) as full replicas per rank.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def make_accelerator(cfg, tracker_dir: str | None = None):
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    env = LaunchEnv.from_environ()
    check_launcher(env)
    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.dtype)
    # The engine decides when gradients sync (see engine.optimizer_step), never the data loader.
    accumulation = GradientAccumulationPlugin(num_steps=cfg.accumulation_steps, sync_with_dataloader=False)
    kwargs = dict(mixed_precision=precision, gradient_accumulation_plugin=accumulation,
                  log_with=None if cfg.report_to == "none" else cfg.report_to, project_dir=tracker_dir)
    # Tokenisation runs before the group exists, so nothing legitimate keeps a rank out of a
    # collective for long; a short timeout turns a peer that hangs into an error within minutes.
    timeout = timedelta(seconds=cfg.collective_timeout_sec)
    handlers = [InitProcessGroupKwargs(timeout=timeout)]
    if cfg.deepspeed:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
            raise UserError("ACCELERATE_USE_CPU is set together with --deepspeed: that silently runs plain DDP. "
                            "Unset ACCELERATE_USE_CPU (or drop --deepspeed).")
        ds_config = load_deepspeed_config(cfg.deepspeed)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config,
                                                     gradient_accumulation_steps=cfg.accumulation_steps,
                                                     gradient_clipping=cfg.grad_clip or None,
                                                     zero3_init_flag=False)
        if not cuda:
            handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout)]
    else:
        kwargs["cpu"] = not cuda
    accelerator = Accelerator(kwargs_handlers=handlers, **kwargs)
    check_group_size(accelerator, env.world_size)
    return accelerator
