"""Batch-1 decode speed of our trunk against Hugging Face transformers on the same random weights, same process.

    python benchmarks/trunk_decode.py                 # GPU: 8B architecture, bf16, 24-token prompt, 128 new tokens
    python benchmarks/trunk_decode.py --device cpu    # anyone: debug preset, fp32, same table

Rows: ours eager, ours compiled (CUDA graphs, GPU only), transformers `generate` with the dynamic cache, and with the
static cache (which transformers compiles; GPU only). Decode tokens/s excludes the first token (prefill + first
sample); TTFT is the time to the first token. On the GPU the last column is decode tokens/s as a fraction of the HBM
roofline: measured device-to-device copy bandwidth / bytes of weights read per token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mm_llama.checkpoints import meta_to_hf_state
from mm_llama.checkpoints.hf_config import llama_to_hf_config
from mm_llama.generate import Generator, Sampling
from mm_llama.llama import Llama, LlamaConfig
from mm_llama.model import MMConfig, MMLlama


def composed(trunk: Llama) -> MMLlama:
    """The text-only composed model around `trunk`: what generation runs."""
    return MMLlama(MMConfig(trunk=trunk.config), trunk=trunk).eval()

LABELS = {"eager": "mm-llama eager", "compiled": "mm-llama compiled", "hf-dynamic": "hf dynamic",
          "hf-static": "hf static"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, nbytes: int = 4 * 2**30) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def time_ours(generator: Generator, prompt: list[int], new_tokens: int, device: torch.device) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s) of one greedy generation."""
    sampling = Sampling(max_new_tokens=new_tokens)
    sync(device)
    start = time.perf_counter()
    first = None
    count = 0
    for _ in generator.stream_batch([prompt], sampling):  # each step syncs (the token goes to the host)
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert count == new_tokens, count
    return first - start, (new_tokens - 1) / (end - first)


def time_hf(hf, prompt: list[int], new_tokens: int, device: torch.device, **kwargs) -> tuple[float, float]:
    """(TTFT seconds, decode tokens/s): HF's generate timed for 1 and for `new_tokens` tokens."""
    ids = torch.tensor([prompt], device=device)

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, **kwargs)
        sync(device)
        assert out.shape[1] == len(prompt) + n
        return time.perf_counter() - start

    ttft = run(1)
    total = run(new_tokens)
    return ttft, (new_tokens - 1) / (total - ttft)


def check_compiled_matches_eager(device: torch.device) -> None:
    """The compiled decode path computes what the eager one does: greedy tokens of a peaked fp32 model agree."""
    torch.manual_seed(1)
    with torch.device(device):
        small = Llama(LlamaConfig.preset("debug"))
    small.init_weights(std=0.3)
    small.eval().requires_grad_(False)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    sampling = Sampling(max_new_tokens=64)
    eager = Generator(composed(small)).generate(prompts, sampling)
    compiled = Generator(composed(small), compile=True).generate(prompts, sampling)
    print(f"  compiled and eager greedy tokens agree (debug preset, fp32, batch of 2): {eager == compiled}")


def build_hf(model: Llama):
    """transformers' LlamaForCausalLM sharing our weights (wq/wk permuted copies)."""
    import transformers

    cfg = llama_to_hf_config(model.config, model.tok_embeddings.weight.dtype)
    cfg.pop("architectures"), cfg.pop("model_type"), cfg.pop("torch_dtype")
    hf_config = transformers.LlamaConfig(**cfg)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_config)
    state = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("output.weight")
    hf.load_state_dict(meta_to_hf_state(state, model.config), strict=True, assign=True)
    hf.tie_weights()
    # The rotary buffer is not in the state dict: build it for real on the weights' device.
    device = model.tok_embeddings.weight.device
    hf.model.rotary_emb = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config).to(device)
    return hf.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", help="default: 8B on cuda, debug on cpu")
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (the median is reported)")
    parser.add_argument("--skip", default="", help="comma-separated rows to skip: eager,compiled,hf-dynamic,hf-static")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    preset = args.preset or ("8B" if gpu else "debug")
    dtype = torch.bfloat16 if gpu else torch.float32
    skip = set(filter(None, args.skip.split(",")))

    config = LlamaConfig.preset(preset, max_seq_len=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(config).to(dtype)
    model.init_weights()
    model.eval().requires_grad_(False)
    prompt = torch.randint(0, config.vocab_size, (args.prompt_len,)).tolist()
    weight_bytes = sum({id(p): p.numel() * p.element_size() for p in model.parameters()}.values())

    rows: list[tuple[str, float, float]] = []

    def measure(name: str, fn) -> None:
        if name in skip:
            return
        try:
            fn()  # warm-up (compiles where there is something to compile)
            results = [fn() for _ in range(args.repeats)]
        except Exception as e:  # a peer that fails to run is reported, not fatal to the other rows
            print(f"  {name}: failed: {type(e).__name__}: {e}", flush=True)
            return
        ttft = statistics.median(r[0] for r in results)
        rate = statistics.median(r[1] for r in results)
        rows.append((LABELS[name], ttft, rate))
        print(f"  {name}: ttft {ttft * 1e3:.1f} ms, decode {rate:.1f} tok/s", flush=True)

    print(f"{preset} ({config.n_layers} layers, dim {config.dim}), {dtype}, {device}, "
          f"{weight_bytes / 1e9:.2f} GB of weights, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    eager = Generator(composed(model))
    measure("eager", lambda: time_ours(eager, prompt, args.new_tokens, device))
    if gpu:
        compiled = Generator(composed(model), compile=True)
        measure("compiled", lambda: time_ours(compiled, prompt, args.new_tokens, device))
        if "compiled" not in skip:
            check_compiled_matches_eager(device)
    hf = build_hf(model)
    with torch.inference_mode():
        measure("hf-dynamic", lambda: time_hf(hf, prompt, args.new_tokens, device))
        if gpu:
            measure("hf-static", lambda: time_hf(hf, prompt, args.new_tokens, device,
                                                 cache_implementation="static"))

    bandwidth = copy_bandwidth(device) if gpu else None
    peer = dict((name, rate) for name, _, rate in rows).get(LABELS["hf-dynamic"])
    print()
    header = f"| {'implementation':<17} | {'TTFT ms':>8} | {'decode tok/s':>12} | {'× hf-dynamic':>12} |"
    if bandwidth:
        header += " of HBM roofline |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, ttft, rate in rows:
        line = f"| {name:<17} | {ttft * 1e3:8.1f} | {rate:12.1f} | {rate / peer if peer else float('nan'):12.2f} |"
        if bandwidth:
            line += f" {rate * weight_bytes / bandwidth:15.1%} |"
        print(line)
    if bandwidth:
        print(f"\ncopy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); roofline "
              f"{bandwidth / weight_bytes:.0f} tok/s for {weight_bytes / 1e9:.2f} GB of weights; "
              f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
