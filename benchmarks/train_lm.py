"""Training throughput of stage `lm` on GPUs: tokens/s, peak memory, and model FLOP utilisation against the bf16
matrix-multiply rate measured on the same machine.

    torchrun --nproc_per_node 1 benchmarks/train_lm.py --preset 1B --tokenizer tokenizer.model
    torchrun --nproc_per_node 2 benchmarks/train_lm.py --preset 1B --tokenizer tokenizer.model --batch-size 2
    torchrun --nproc_per_node 1 benchmarks/train_lm.py --preset 8B --activation-checkpointing ...

The corpus is long generated shapes-world documents (rows are full `seq_len`), written once under --work. Each run's
per-step losses go to its log.jsonl, so runs with the same global batch (batch size x GPUs x grad_accum) can be
compared step by step (`--compare DIR DIR`).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch


def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """bf16 FLOP/s of an n x n x n product on random data (the ceiling MFU is measured against)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def make_corpus(work: Path, repeated: bool, n_docs: int = 2000) -> Path:
    """Long documents of shapes-world sentences, packed into shards (so every row fills seq_len).

    `repeated`: every document is the same one. Ranks read different shards, so only then do one GPU and two GPUs
    see the same global batches, and their per-step losses must agree up to bf16 rounding.
    """
    from mm_llama.data.pack import pack
    from mm_llama.data.synth_text import text_sample

    out = work / ("corpus-repeated" if repeated else "corpus")
    if (out / "done").exists():
        return out
    rng, texts = random.Random(0), []
    while len(texts) < n_docs * 40:  # the plain-text descriptions (a third of the corpus's samples; the rest are chats)
        sample = text_sample(rng)
        if "txt" in sample:
            texts.append(sample["txt"].decode())
    lines = out.with_suffix(".jsonl")
    with open(lines, "w") as f:
        for i in range(n_docs):
            doc = 0 if repeated else i
            f.write(json.dumps({"text": " ".join(texts[doc * 40:(doc + 1) * 40])}) + "\n")
    pack("text", lines, out, shard_size=500)
    (out / "done").write_text("")
    return out


def flops_per_token(config, seq_len: int) -> float:
    """6 N (weights, forward + backward) + 12 L D T (attention scores and values; causal masking not discounted)."""
    n = config.n_layers * (2 * config.dim * config.dim + 2 * config.dim * config.n_kv_heads * config.head_dim
                           + 3 * config.dim * config.ffn_hidden_dim) + config.dim * config.vocab_size
    return 6 * n + 12 * config.n_layers * config.dim * seq_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1B")
    parser.add_argument("--tokenizer", required=True, help="the real Llama 3 tokenizer.model (vocab 128256)")
    parser.add_argument("--work", default="/tmp/mm_llama_bench")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4, help="per GPU")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--tag", default="")
    parser.add_argument("--repeated", action="store_true", help="one document repeated (see make_corpus)")
    parser.add_argument("--compare", nargs=2, metavar="RUN", help="only compare the losses of two finished runs")
    args = parser.parse_args()
    if args.compare:
        logs = [{r["step"]: r["loss"] for r in map(json.loads, open(Path(d) / "log.jsonl"))} for d in args.compare]
        steps = sorted(set(logs[0]) & set(logs[1]))
        diffs = [abs(logs[0][s] - logs[1][s]) for s in steps]
        print(f"{len(steps)} common steps; max |loss difference| {max(diffs):.4f}, mean {statistics.mean(diffs):.4f}"
              f"; first losses {logs[0][steps[0]]:.4f} / {logs[1][steps[0]]:.4f}, last {logs[0][steps[-1]]:.4f} / "
              f"{logs[1][steps[-1]]:.4f}")
        return

    from mm_llama.config import load_config, to_yaml
    from mm_llama.train.distributed import init_runtime
    from mm_llama.train.lm import LMStage, LMStageConfig
    from mm_llama.train.loop import train

    runtime = init_runtime()
    work = Path(args.work)
    corpus = work / ("corpus-repeated" if args.repeated else "corpus")
    if runtime.is_main:
        make_corpus(work, args.repeated)
    runtime.barrier()
    peak = matmul_peak(runtime.device)
    tag = args.tag or f"{args.preset}-{runtime.world_size}gpu-b{args.batch_size}"
    run_dir = work / "runs" / f"{tag}-{int(time.time())}"
    overrides = [f"--model={args.preset}", "--model.vocab_size=128256", f"--model.max_seq_len={args.seq_len}",
                 f"--data.shards={corpus}", f"--data.tokenizer={args.tokenizer}",
                 f"--data.seq_len={args.seq_len}", f"--data.batch_size={args.batch_size}", "--data.num_workers=2",
                 f"--train.out_dir={run_dir}", f"--train.steps={args.steps}", "--train.log_every=1",
                 f"--train.checkpoint_every={args.steps + 1}", f"--train.grad_accum={args.grad_accum}",
                 "--train.warmup_steps=5", f"--train.lr={args.lr}",
                 f"--train.activation_checkpointing={str(args.activation_checkpointing).lower()}",
                 f"--train.compile={str(args.compile).lower()}"]
    config = load_config(LMStageConfig, None, overrides)
    torch.cuda.reset_peak_memory_stats()
    train(LMStage(config), config.train, config_yaml=to_yaml(config), runtime=runtime)
    memory = torch.cuda.max_memory_allocated() / 2**30
    memories = runtime.all_sum([memory])
    if runtime.is_main:
        records = [json.loads(line) for line in open(run_dir / "log.jsonl")]
        rates = [r["tokens_per_s"] for r in records[5:]]  # after compilation and allocator warm-up
        rate = statistics.median(rates)
        per_gpu = rate / runtime.world_size
        mfu = per_gpu * flops_per_token(config.model, args.seq_len) / peak
        print(f"RESULT {tag}: {rate:,.0f} tok/s total, {per_gpu:,.0f} tok/s per GPU, peak memory "
              f"{memories[0] / runtime.world_size:.1f} GiB per GPU, MFU {mfu:.1%} of the measured "
              f"{peak / 1e12:.0f} TFLOP/s bf16 matmul; losses in {run_dir / 'log.jsonl'}", flush=True)
        import shutil

        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final checkpoint: tens of GB, not needed
    from mm_llama.train.distributed import shutdown

    shutdown(runtime)


if __name__ == "__main__":
    main()
