"""The training loop every stage shares.

A stage (see `Stage`) says what model to build, which of its parameters train, where batches come from and what the
loss is; this loop does the rest: devices and FSDP2, precision, AdamW with warm-up + cosine, gradient accumulation and
clipping, the non-finite guard, logging, atomic checkpoints every N steps and on SIGTERM/SIGINT, and exact resume.

Precision: on a GPU, parameters, gradients and optimizer state stay fp32 (the master copy, and fp32 gradient
accumulation: the paper found bf16 accumulation unstable) while the forward/backward compute runs in bf16 (autocast
in one process; FSDP2's mixed-precision policy under torchrun). On the CPU everything is fp32.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import nn

from mm_llama.devices import device_problem
from mm_llama.errors import ConfigError, TrainingError
from mm_llama.train.checkpoint import (
    TRAIN_STATE,
    latest_checkpoint,
    load_train_state,
    rng_states,
    set_rng_states,
    write_checkpoint_dir,
)
from mm_llama.train.distributed import Runtime, init_runtime, prepare_model, shutdown
from mm_llama.train.run_lock import RunLock
from mm_llama.train.stop import StopRequest, signal_name
from mm_llama.values import is_finite_number, is_int


@dataclass
class TrainConfig:
    """The `train:` section of every stage's YAML."""

    out_dir: str = "runs/train"
    steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 100
    weight_decay: float = 0.1  # matrices only; norms, biases and gates are not decayed
    # Parameter name or its end on a dot ("moment_mix", "wq.weight") -> multiplier of the learning rate, warm-up and
    # cosine included. For a few parameters that must travel far in few steps (the video blocks' moment mix: issue 11).
    lr_scales: dict[str, float] = field(default_factory=dict)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch_size x ranks x grad_accum)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 compute on GPU, fp32 on CPU
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False
    cpu_offload: bool = False  # FSDP2 CPU offload of parameters, gradients and optimizer state (torchrun only)
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        positive = ("steps", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints")
        bad = [f"{name} must be an integer >= 1, got {getattr(self, name)!r}" for name in positive
               if not is_int(getattr(self, name)) or getattr(self, name) < 1]
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            bad.append(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        ranges = {"lr": (lambda v: v > 0, "> 0"), "min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
                  "weight_decay": (lambda v: v >= 0, ">= 0"), "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
                  "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"), "eps": (lambda v: v > 0, "> 0"),
                  "grad_clip": (lambda v: v > 0, "> 0")}
        for name, (accepts, text) in ranges.items():
            value = getattr(self, name)
            if not (is_finite_number(value) and accepts(value)):
                bad.append(f"{name} must be a finite number {text}, got {value!r}")
        if not isinstance(self.lr_scales, dict):
            bad.append(f"lr_scales must be a mapping of parameter name to multiplier, got {self.lr_scales!r}")
        else:
            bad += [f"lr_scales[{name!r}] must be a finite number > 0, got {scale!r}"
                    for name, scale in self.lr_scales.items()
                    if not isinstance(name, str) or not (is_finite_number(scale) and scale > 0)]
        if problem := device_problem(self.device, "device"):
            bad.append(problem)
        if bad:
            raise ConfigError("invalid train config: " + "; ".join(bad))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warm-up, then cosine down to lr * min_lr_ratio."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Stage(Protocol):
    """What a training stage provides to the loop (each stage script implements it in ~100 lines)."""

    name: str

    def build(self, runtime: Runtime) -> nn.Module:
        """The whole model on `runtime.device`, fp32, with frozen parts already `requires_grad_(False)`."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """Units for FSDP sharding, activation checkpointing and compilation (e.g. transformer layers). A stage may
        also define `checkpoint_blocks(model)`: the subset worth recomputing under `activation_checkpointing`
        (default: all of them)."""

    def batches(self, runtime: Runtime, start: int) -> Iterator[dict]:
        """This rank's batches from batch number `start` on, deterministically (exact resume)."""

    def n_targets(self, batch: dict) -> int:
        """Tokens (or items) the loss of `batch` sums over."""

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """fp32 scalar: the loss *summed* over the batch's targets (the loop normalises over the global batch)."""

    def save(self, trainable: dict[str, torch.Tensor], out: Path) -> None:
        """Write the trained weights (full tensors, by parameter name) into `out` in mm-llama's format."""

    def load(self, ckpt: Path) -> dict[str, torch.Tensor]:
        """Read back what `save` wrote, by parameter name."""


@dataclass
class TrainResult:
    model: nn.Module
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean loss over the global batch
    last_step: int = 0
    stop_signal: int = 0  # the SIGTERM/SIGINT that stopped the run early (after a checkpoint), or 0
    last_checkpoint: Path | None = None


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen floating-point parameters in `dtype` (buffers such as RoPE tables keep theirs). With bf16
    compute a frozen weight is only ever read in bf16, and released checkpoints are bf16: an fp32 copy of a frozen 8B
    trunk would hold 16 GB more and add nothing."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: matrices decayed, the rest not; each group's `lr_scale` multiplies the
    schedule's learning rate (`cfg.lr_scales`; `set_lr`)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError("the stage has no trainable parameters")

    by_group: dict[tuple[bool, float], list[nn.Parameter]] = {}
    used: set[str] = set()
    for name, p in trainable:
        hits = [key for key in cfg.lr_scales if name == key or name.endswith("." + key)]
        if len(hits) > 1:
            raise ConfigError(f"train.lr_scales: {hits} all name parameter {name}; give one")
        used.update(hits)
        by_group.setdefault((p.dim() >= 2, float(cfg.lr_scales[hits[0]]) if hits else 1.0), []).append(p)
    if unknown := [key for key in cfg.lr_scales if key not in used]:
        raise ConfigError(f"train.lr_scales names {unknown}, which no trainable parameter is called (e.g. "
                          f"{', '.join(name for name, _ in trainable[:3])})")
    groups = [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
              for (decay, scale), params in sorted(by_group.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    fused = device.type == "cuda" and not cfg.cpu_offload
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's `lr` into every group, times the group's `lr_scale` (`build_optimizer`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def train(stage: Stage, cfg: TrainConfig, *, config_yaml: str = "", resume: bool = False,
          runtime: Runtime | None = None) -> TrainResult:
    """Run (or resume) a stage's training. Returns the model and the per-step losses.

    Args:
        config_yaml: the resolved run config, saved beside the log and in every checkpoint.
        resume: continue from the latest checkpoint in `cfg.out_dir` (model, optimizer, step, data position, RNG).
            The learning-rate schedule keeps the length it was started with (stored in the checkpoint): a changed
            `steps` moves where the run ends, not the shape of its schedule.
    Raises:
        TrainingError when `cfg.out_dir` is in use by a live run or cannot be written, when a checkpoint cannot be
        written (the previous one stays intact), or on a non-finite loss.
    """
    runtime = runtime or init_runtime(cfg.device)
    run_dir = Path(cfg.out_dir)
    with _run_directory(run_dir, runtime):
        return _train(stage, cfg, config_yaml, resume, runtime, run_dir)


@contextlib.contextmanager
def _run_directory(run_dir: Path, runtime: Runtime):
    """Create the run directory and hold its lock (rank 0) for the whole run; every rank fails alike."""
    lock, problem = RunLock(run_dir), None
    if runtime.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.__enter__()
        except OSError as e:
            problem = TrainingError(f"cannot create train.out_dir {run_dir}: {e.strerror}")
        except TrainingError as e:
            problem = e
    if runtime.any(problem is not None):
        raise problem or TrainingError(f"rank 0 could not take the run directory {run_dir} (see its error)")
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _train(stage: Stage, cfg: TrainConfig, config_yaml: str, resume: bool, runtime: Runtime,
           run_dir: Path) -> TrainResult:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    previous = latest_checkpoint(run_dir)
    if resume and previous is None:
        raise TrainingError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} to resume from")
    if not resume and previous is not None:
        raise TrainingError(f"{run_dir} already holds checkpoints (latest {previous.name}); pass --resume to continue "
                            "it or set --train.out_dir to a new directory")

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = stage.build(runtime)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and runtime.device.type == "cuda")
    if bf16 and not runtime.distributed:  # (FSDP2 shards frozen weights instead, and gathers them in bf16)
        cast_frozen(model, torch.bfloat16)
    checkpointed = getattr(stage, "checkpoint_blocks", stage.blocks)(model) if cfg.activation_checkpointing else []
    prepare_model(model, stage.blocks(model), runtime, bf16=bf16, checkpointed=checkpointed, compile=cfg.compile,
                  cpu_offload=cfg.cpu_offload)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg, runtime.device)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    step, data_position, schedule, notes = 0, 0, cfg, []
    if resume:
        state = load_train_state(previous)
        weights = stage.load(previous)
        if sorted(weights) != sorted(trainable):
            raise TrainingError(f"{previous}: its weights {sorted(set(weights) ^ set(trainable))[:5]} do not match "
                                "this stage's trainable parameters")
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        scales = [group["lr_scale"] for group in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        for group, scale in zip(optimizer.param_groups, scales, strict=True):  # this run's, not the checkpoint's
            group["lr_scale"] = scale
        step, data_position = state["step"], state["data_position"]
        set_rng_states(state["rng"][runtime.rank])
        schedule, notes = _resumed_schedule(cfg, state.get("schedule_steps", cfg.steps))
        if step >= cfg.steps:
            notes.append(f"the run is already at step {step}, train.steps is {cfg.steps}: nothing to train")

    def save_checkpoint(at_step: int) -> Path | None:
        weights = {k: v for k, v in get_model_state_dict(model, options=full).items() if k in trainable}
        optim_state = get_optimizer_state_dict(model, optimizer, options=full)
        rngs = [rng_states()]
        if runtime.distributed:
            import torch.distributed as dist

            rngs = [None] * runtime.world_size
            dist.all_gather_object(rngs, rng_states())
        path, failure = None, None
        if runtime.is_main:
            def write(tmp: Path) -> None:
                stage.save(weights, tmp)
                torch.save({"optimizer": optim_state, "step": at_step, "data_position": data_position,
                            "rng": rngs, "schedule_steps": schedule.steps}, tmp / TRAIN_STATE)
                (tmp / "config.yaml").write_text(config_yaml)

            try:
                path = write_checkpoint_dir(run_dir, at_step, write, cfg.keep_checkpoints)
            except Exception as e:  # disk full, quota, permissions: OSError, SafetensorError, torch's RuntimeError
                failure = e
        if runtime.any(failure is not None):
            what = f"{type(failure).__name__}: {failure}" if failure is not None else "see rank 0's error"
            raise TrainingError(f"step {at_step}: writing the checkpoint into {run_dir / 'checkpoints'} failed "
                                f"({what}); nothing of it was kept. The last good checkpoint is "
                                f"{result.last_checkpoint or 'none'}") from failure
        return path

    log_file = None
    if runtime.is_main:
        try:
            (run_dir / "config.yaml").write_text(config_yaml)
            log_file = open(run_dir / "log.jsonl", "a")
        except OSError as e:
            raise TrainingError(f"cannot write into train.out_dir {run_dir}: {e.strerror} ({e.filename})") from None
        resumed = f"; resumed at step {step}" if resume else ""
        print(f"[{stage.name}] {len(trainable)} trainable tensors, {sum(p.numel() for p in params):,} trainable "
              f"parameters, {runtime.world_size} rank(s), {runtime.device}, "
              f"{'bf16' if bf16 else 'fp32'} compute{resumed}", flush=True)
        for note in notes:
            print(f"[{stage.name}] note: {note}", flush=True)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and not runtime.distributed
                else contextlib.nullcontext())
    result = TrainResult(model=model, last_step=step, last_checkpoint=previous)
    batches = stage.batches(runtime, data_position)
    skipped_total = 0
    from tqdm import tqdm

    progress = tqdm(total=cfg.steps, initial=step, disable=None if runtime.is_main else True, desc=stage.name)
    try:
        with StopRequest() as stop:
            while step < cfg.steps:
                step += 1
                started = time.perf_counter()
                micro = [next(batches) for _ in range(cfg.grad_accum)]
                local_targets = sum(stage.n_targets(b) for b in micro)
                targets, skipped = runtime.all_sum([local_targets, sum(b.get("skipped", 0) for b in micro)])
                lr = lr_at(step, schedule)
                set_lr(optimizer, lr)
                loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
                for batch in micro:
                    with autocast:
                        loss = stage.loss(model, batch)
                    # Mean over the global batch; FSDP averages gradients over ranks, hence the world size.
                    (loss * (runtime.world_size / max(targets, 1))).backward()
                    loss_sum += loss.detach().double()
                mean_loss = runtime.all_sum([loss_sum.item()])[0] / max(targets, 1)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
                    raise TrainingError(f"step {step}: loss {mean_loss} / gradient norm {grad_norm} is not finite; "
                                        "stopped before the optimizer step (weights are those after step "
                                        f"{step - 1}; last checkpoint: {result.last_checkpoint or 'none'})")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                data_position += cfg.grad_accum
                skipped_total += int(skipped)
                result.losses[step], result.last_step = mean_loss, step
                elapsed = time.perf_counter() - started
                progress.update(1)
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                if runtime.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
                    record = {"step": step, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": targets / elapsed, "samples_skipped": skipped_total}
                    try:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    except OSError as e:
                        raise TrainingError(f"step {step}: cannot append to {log_file.name}: {e.strerror}; the last "
                                            f"good checkpoint is {result.last_checkpoint or 'none'}") from None
                    progress.write(f"step {step}: loss {mean_loss:.4f}  lr {lr:.2e}  grad norm {grad_norm:.3f}  "
                                   f"{targets / elapsed:,.0f} tok/s  skipped {skipped_total}")
                # Every rank takes the signal of any rank (a scheduler may signal them at different moments).
                stop_signal = runtime.all_max(stop.signal)
                if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop_signal:
                    result.last_checkpoint = save_checkpoint(step) or result.last_checkpoint
                if stop_signal:
                    result.stop_signal = stop_signal
                    if runtime.is_main:
                        progress.write(f"stopped by {signal_name(stop_signal)} at step {step} of {cfg.steps}; "
                                       f"checkpoint {result.last_checkpoint}; continue with --resume")
                    break
    finally:
        progress.close()
        # Shut the DataLoader workers down now, on every way out: they ignore SIGTERM (`mm_llama.train.stop`), so
        # left to interpreter exit (an exception's traceback can keep the iterator alive until then) they would
        # outlive multiprocessing's terminate() and the process would wait for them forever.
        if hasattr(batches, "close"):
            batches.close()
        if log_file is not None:
            with contextlib.suppress(OSError):  # a full disk fails the close too; the error above says it all
                log_file.close()
    return result


def _resumed_schedule(cfg: TrainConfig, schedule_steps: int) -> tuple[TrainConfig, list[str]]:
    """The config whose `steps` shapes the LR schedule of a resumed run: the stored length, said aloud if changed."""
    if schedule_steps == cfg.steps:
        return cfg, []
    import dataclasses

    schedule = dataclasses.replace(cfg, steps=schedule_steps)
    after = (f"; steps {schedule_steps + 1}-{cfg.steps} run at the final learning rate "
             f"{lr_at(schedule_steps, schedule):.2e}" if cfg.steps > schedule_steps else "")
    return schedule, [f"train.steps is {cfg.steps} but the run started with {schedule_steps}: the learning-rate "
                      f"schedule keeps its length of {schedule_steps} steps (stored in the checkpoint){after}. To "
                      "train with a new schedule, start a new run"]


def run_stage(config_cls: type, make_stage, config_path: str | None, overrides=(), resume: bool = False, *,
              result_name: str = "checkpoint") -> TrainResult:
    """What every stage's `main` does: load the config strictly, print it, build the stage, train."""
    from mm_llama.config import load_config, to_yaml

    config = load_config(config_cls, config_path, overrides)
    text = to_yaml(config)
    stage = make_stage(config)
    runtime = init_runtime(config.train.device)
    if runtime.is_main:
        print(text, flush=True)
    try:
        result = train(stage, config.train, config_yaml=text, resume=resume, runtime=runtime)
    finally:
        # Left to interpreter exit, the process group's threads were torn down in any order: once in a while a rank
        # aborted after its work was saved ("terminate called without an active exception", exit -6).
        shutdown(runtime)
    if runtime.is_main and result.last_checkpoint is not None:
        print(f"{result_name}: {result.last_checkpoint}", flush=True)
    return result
