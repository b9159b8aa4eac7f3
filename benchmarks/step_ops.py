"""Ops dispatched by one training step of stage `image-adapter` on the demo model, and its CPU time per step.

    python benchmarks/step_ops.py                          # counts + CPU time of this tree
    python benchmarks/step_ops.py --baseline HEAD          # the same, side by side with a commit's code
    python benchmarks/step_ops.py --precision fp32 --by-module

On a GPU the demo's image-adapter step is bound by kernel launches and CPU dispatch (~2,100 kernels per forward +
backward, 17.6 ms of GPU work in a ~150 ms step at batch 128): every aten op that reaches a kernel costs a launch
whatever the batch. This counts them on the CPU, where they are the same ops up to the attention kernels (SDPA
dispatches differently per device) and autocast's cast lists (CPU autocast leaves norms, softmax and pointwise ops in
their input dtype; CUDA's puts some in fp32). The streams that matter here are fp32 either way (the gates are fp32
parameters), so the casts counted are close to CUDA's.

The model is built as the stage builds it (`ImageAdapterStage.build`, `loop.train`): the shipped demo model's
weights (`MMLlama.from_pretrained("demo")`, the demo config: 6 x 256 trunk, ViT 96 wide at 84-px tiles, 3 gated
cross-attention blocks), fp32, trunk frozen, ViT trainable; with `--precision bf16` (default) the frozen trunk is cast
to bf16 (`cast_frozen`) and the step runs under `torch.autocast("cpu", bfloat16)`, the CPU twin of the GPU's policy.
The batch: shapes-world pictures (`world_draw`, tiled by `Images.prepare`) and random text ids with `<|image|>` after
BOS; the loss is the stage's (summed cross-entropy of next tokens).

Counts are of aten ops reaching the backend (a `TorchDispatchMode`: after autocast and autograd, so autocast's casts
and every backward op are included), grouped by op and by module: a forward op belongs to the innermost module
running, a backward op to the module whose forward made the autograd node being run. "kernels" leaves out views and
bare allocations, which launch nothing.

F.rms_norm is one op in eager PyTorch that runs a composite on the CPU (a cast up, pow, mean, add, rsqrt, mul, a cast
back; a dozen ops backward) and one fused kernel each way on CUDA (`_fused_rms_norm`): the row "CUDA est." counts
each call as that (one kernel forward, one backward, one more for a weight's gradient).

`--baseline REF` runs the same measurement in a subprocess on `git archive REF`'s mm_llama/encoders/adapters (the
whole tree at REF, so that it is self-consistent), this script unchanged: 69d01ee (or any later commit before the op
cuts) gives the counts before them. Timings alternate between the two trees (`--rounds`) and run on one thread by
default (`--threads`), so that other processes' load falls on both alike.

Measured against 69d01ee's code (kernel ops per forward + backward, views left out; batch 2 x 128 tokens):

                                   bf16 + autocast        fp32
                                   before   after    before   after
    kernel ops on the CPU            1854    1633      1446    1250
    CUDA est. (F.rms_norm fused)     1854    1214      1446     820

The step's CPU time hardly moves (2-core VM, one thread; min of 24 steps, medians within the run-to-run noise of
10-15 %): bf16 batch 2 258 -> 244 ms, batch 32 3559 -> 3414 ms; fp32 batch 2 133 -> 120 ms, batch 32 1692 -> 1621
ms. Even at batch 2 the CPU step is bound by its matrix products and attention, not by dispatch (~10 us an op).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from encoders.image_transform import Images
from mm_llama.data.world import random_scene
from mm_llama.data.world_draw import draw_scene
from mm_llama.media import Media
from mm_llama.model import MMLlama
from mm_llama.train.loop import cast_frozen

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("mm_llama", "encoders", "adapters")
IGNORE = -100
# Ops that launch no kernel besides the views (`OpOverload.is_view`).
NO_KERNEL = {"aten::_unsafe_view", "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
             "aten::new_empty_strided", "aten::lift_fresh", "aten::_reshape_alias"}


def build(precision: str) -> MMLlama:
    """The demo model as stage image-adapter trains it: fp32 weights, trunk frozen, ViT and adapter trainable; bf16:
    the frozen weights stored in bf16 (`cast_frozen`)."""
    model = MMLlama.from_pretrained("demo", dtype=torch.float32)
    model.trunk.requires_grad_(False)
    if precision == "bf16":
        cast_frozen(model, torch.bfloat16)
    return model.train()


def make_batch(model: MMLlama, batch: int, seq: int, seed: int = 0) -> dict:
    """`batch` shapes-world pictures and rows of `seq` + 1 random ids: BOS, `<|image|>`, text."""
    rng = random.Random(seed)
    v = model.config.vision
    pictures = [[draw_scene(random_scene(rng), v.tile_size, rng)] for _ in range(batch)]
    images = Images.prepare(pictures, tile_size=v.tile_size, max_tiles=v.max_tiles)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.trunk.config.vocab_size, (batch, seq + 1), generator=g)
    tokens[:, 1] = model.image_id
    labels = tokens.clone()
    labels[:, :2] = IGNORE  # BOS and <|image|> are never targets
    return {"images": images, "tokens": tokens, "labels": labels}


def step(model: MMLlama, batch: dict, precision: str) -> torch.Tensor:
    """One forward (the stage's loss) and backward; the loss."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with autocast:
        logits = model(batch["tokens"][:, :-1], Media(images=batch["images"]))  # (B, T, V) fp32
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE,
                               reduction="sum")
    loss.backward()
    return loss.detach()


class OpCounter(TorchDispatchMode):
    """Counts (phase, op, module, launches a kernel, inside F.rms_norm) of every aten op dispatched; module names with
    layer numbers folded to `N`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names = {m: re.sub(r"\.\d+(?=\.|$)", ".N", name) or "(model)" for name, m in model.named_modules()}
        self.stack: list[str] = []
        self.owner: dict = {}  # autograd node -> the module whose forward created it
        self.in_rms_norm = 0  # > 0 while F.rms_norm runs its forward
        self.rms_norm_nodes: set = set()  # the autograd nodes F.rms_norm made
        self.rms_norm_calls = Counter()  # forward, backward, weight (gradients of the weight too)
        self.counts: Counter = Counter()

    def _claim(self, values, name: str) -> None:
        """Give every autograd node behind `values` that no module has claimed yet to `name`."""
        todo = [t.grad_fn for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or node in self.owner:
                continue
            self.owner[node] = name
            todo.extend(next_node for next_node, _ in node.next_functions)

    def _pre(self, module, args):
        if module in self.names:
            self._claim(args, self.stack[-1] if self.stack else "(outside)")  # made between modules: the parent's
            self.stack.append(self.names[module])

    def _post(self, module, args, output):
        if module in self.names:
            self._claim(output, self.stack.pop())

    def rms_norm(self, out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None) -> None:
        """Note one F.rms_norm call and the autograd nodes it made (those behind `out` up to `x`'s)."""
        self.rms_norm_calls["forward"] += 1
        todo = [out.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node is x.grad_fn or node in self.rms_norm_nodes or not node.next_functions:
                continue  # (no next functions: a leaf's AccumulateGrad)
            self.rms_norm_nodes.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
        if out.grad_fn is not None:
            self.rms_norm_calls["backward"] += 1
            self.rms_norm_calls["weight"] += weight is not None and weight.requires_grad

    def __enter__(self):
        self.hooks = [nn.modules.module.register_module_forward_pre_hook(self._pre),
                      nn.modules.module.register_module_forward_hook(self._post)]
        self.functions = RmsNormCalls(self)
        self.functions.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        self.functions.__exit__(*exc)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        node = torch._C._current_autograd_node()
        if node is None:
            phase, module, fused = "forward", self.stack[-1] if self.stack else "(outside: loss)", self.in_rms_norm > 0
        else:
            phase, module = "backward", self.owner.get(node, f"({node.name().split('::')[-1]})")
            fused = node in self.rms_norm_nodes
        name = "aten::" + func.__name__.split(".")[0]
        kernel = not func.is_view and name not in NO_KERNEL
        self.counts[phase, name, module, kernel, fused] += 1
        return func(*args, **(kwargs or {}))


class RmsNormCalls(TorchFunctionMode):
    """Tells the counter which ops F.rms_norm runs: the CPU runs its composite (a cast up, pow, mean, add, rsqrt, mul,
    a cast back; a dozen ops backward) where CUDA runs one `_fused_rms_norm` kernel forward and one backward (two
    with a weight gradient)."""

    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.rms_norm:
            return func(*args, **kwargs)
        self.counter.in_rms_norm += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.counter.in_rms_norm -= 1
        weight = kwargs.get("weight", args[2] if len(args) > 2 else None)
        self.counter.rms_norm(out, args[0], weight)
        return out


def count_ops(model: MMLlama, batch: dict, precision: str) -> dict:
    """The ops of one step (after a warm-up step): {"ops": [[phase, op, module, kernel, in F.rms_norm, count]],
    "rms_norm_calls": {forward, backward, weight}}."""
    step(model, batch, precision)
    model.zero_grad(set_to_none=True)
    counter = OpCounter(model)
    with counter:
        step(model, batch, precision)
    model.zero_grad(set_to_none=True)
    return {"ops": [[*key, n] for key, n in sorted(counter.counts.items())],
            "rms_norm_calls": dict(counter.rms_norm_calls)}


def time_steps(model: MMLlama, batch: dict, precision: str, repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Wall and this thread's CPU seconds of `repeats` forward + backward steps after `warmup` (gradients cleared
    outside the timing). With one thread all the work is this thread's, and its CPU time does not count the moments
    other processes hold the core: the steadier of the two on a shared machine."""
    times = {"wall": [], "cpu": []}
    for i in range(warmup + repeats):
        model.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter(), time.thread_time()
        step(model, batch, precision)
        if i >= warmup:
            times["wall"].append(time.perf_counter() - wall)
            times["cpu"].append(time.thread_time() - cpu)
    return times


def measure(args, *, count: bool = True) -> dict:
    """Op counts (if `count`) and per-step times (ms, per batch size) of this process's code."""
    import mm_llama

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build(args.precision)
    result = {"source": str(Path(mm_llama.__file__).parent.parent), "ms": {}}
    if count:
        result.update(count_ops(model, make_batch(model, args.count_batch, args.seq), args.precision))
    for b in args.time_batches:
        times = time_steps(model, make_batch(model, b, args.seq), args.precision, args.repeats)
        result["ms"][str(b)] = {kind: [1e3 * t for t in values] for kind, values in times.items()}
    return result


def measure_at(ref: str, argv: list[str], tmp: str) -> dict:
    """`measure` in a subprocess on the packages of commit `ref` (this script unchanged), exported into `tmp`."""
    if not (Path(tmp) / "mm_llama").exists():
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, *PACKAGES], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
    out = subprocess.run([sys.executable, __file__, *argv, "--json"], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": tmp}, cwd=tmp)
    return json.loads(out.stdout)


def totals(result: dict, *, kernel_only: bool = False) -> Counter:
    """Per phase, op, module and part, and overall; with the CUDA estimate for F.rms_norm."""
    total = Counter()
    for phase, op, module, kernel, fused, n in result["ops"]:
        if kernel_only and not kernel:
            continue
        for key in ("all", ("phase", phase), ("op", op), ("module", module), ("part", module.split(".")[0])):
            total[key] += n
        total["kernels" if kernel else "views"] += n
        if kernel and fused:
            total["in F.rms_norm"] += n
        elif kernel:
            total["cuda op", op] += n
    calls = result.get("rms_norm_calls", {})
    total["F.rms_norm calls"] = calls.get("forward", 0)
    fused = calls.get("forward", 0) + calls.get("backward", 0) + calls.get("weight", 0)
    total["cuda op", "aten::_fused_rms_norm (+ backward)"] = fused
    total["kernels, F.rms_norm fused (CUDA est.)"] = total["kernels"] - total["in F.rms_norm"] + fused
    return total


def table(title: str, keys: list, columns: list[tuple[str, Counter]]) -> None:
    print(f"\n{title}")
    print(f"  {'':58s}" + "".join(f"{name:>10s}" for name, _ in columns) + ("       cut" if len(columns) == 2 else ""))
    for key in keys:
        values = [c[key] for _, c in columns]
        label = key[-1] if isinstance(key, tuple) else key
        line = f"  {label:58s}" + "".join(f"{v:10d}" for v in values)
        if len(values) == 2:
            line += f"{values[0] - values[1]:10d}"
        print(line)


def report(results: list[tuple[str, dict]], args) -> None:
    for name, r in results:
        print(f"{name}: code from {r['source']}")
    print(f"demo image-adapter step, precision {args.precision}, batch {args.count_batch} x {args.seq} tokens "
          f"(op counts do not depend on the batch)")
    columns = [(name, totals(r)) for name, r in results]
    kernels = [(name, totals(r, kernel_only=True)) for name, r in results]
    table("ops per forward + backward", ["all", "views", "kernels", "F.rms_norm calls", "in F.rms_norm",
                                         "kernels, F.rms_norm fused (CUDA est.)", ("phase", "forward"),
                                         ("phase", "backward")], columns)
    first, last = kernels[0][1], kernels[-1][1]
    ranked = {kind: sorted({k for c in (first, last) for k in c if isinstance(k, tuple) and k[0] == kind},
                           key=lambda k: -max(first[k], last[k])) for kind in ("op", "cuda op", "part", "module")}
    table(f"top {args.top} kernel ops (views left out)", ranked["op"][:args.top], kernels)
    table(f"top {args.top} kernel ops, F.rms_norm counted as on CUDA (est.)", ranked["cuda op"][:args.top], kernels)
    table("kernel ops by part", ranked["part"], kernels)
    if args.by_module:
        table("kernel ops by module (N: every layer of the stack together)", ranked["module"], kernels)
    if not args.time_batches:
        return
    n = len(results[0][1]["ms"][str(args.time_batches[0])]["wall"])
    print(f"\nms per forward + backward on {args.threads} thread(s), min / median of {n} steps: wall clock, and this "
          "thread's CPU time")
    for b in args.time_batches:
        for kind in ("wall", "cpu"):
            cells = [f"{name:>12s} {min(r['ms'][str(b)][kind]):8.1f} / {statistics.median(r['ms'][str(b)][kind]):8.1f}"
                     for name, r in results]
            print(f"  batch {b:<4d} {kind:5s}" + "".join(cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16: frozen weights in bf16 + CPU autocast (the GPU's policy); fp32: the CPU's")
    p.add_argument("--baseline", metavar="REF", help="also measure the code of this commit, side by side")
    p.add_argument("--seq", type=int, default=128, help="text tokens per row")
    p.add_argument("--count-batch", type=int, default=2)
    p.add_argument("--time-batches", type=int, nargs="*", default=[2, 32])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per batch size and round")
    p.add_argument("--rounds", type=int, default=2, help="with --baseline: alternations of the two trees' timings")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (dispatch is one thread's work anyway)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--by-module", action="store_true", help="also list the kernel ops of each module")
    p.add_argument("--json", action="store_true", help="print the raw measurement as JSON (what --baseline reads)")
    p.add_argument("--no-count", action="store_true", help="with --json: timings only")
    args = p.parse_args()
    if args.json:
        print(json.dumps(measure(args, count=not args.no_count)))
        return
    if not args.baseline:
        report([("this tree", measure(args))], args)
        return
    # Timings alternate between the two trees (`--rounds`), so that load from other processes falls on both alike.
    argv = ["--precision", args.precision, "--seq", str(args.seq), "--count-batch", str(args.count_batch),
            "--repeats", str(args.repeats), "--threads", str(args.threads), "--time-batches",
            *map(str, args.time_batches)]
    with tempfile.TemporaryDirectory() as tmp:
        before, after = measure_at(args.baseline, argv, tmp), measure(args)
        for _ in range(args.rounds - 1):
            for result, more in ((before, measure_at(args.baseline, [*argv, "--no-count"], tmp)),
                                 (after, measure(args, count=False))):
                for b, times in more["ms"].items():
                    for kind, values in times.items():
                        result["ms"][b][kind] += values
    report([(args.baseline, before), ("this tree", after)], args)


if __name__ == "__main__":
    main()
