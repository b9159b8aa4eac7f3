"""The speech path's speed (DESIGN §8: 1B conformer + adapter, 60 s of audio, ≤ 25 ms at batch 1 and ≥ 1000× real
time batched), with torchaudio's `Conformer` of the same size run side by side as the peer.

    python benchmarks/speech_latency.py --json speech.json                     # GPU: paper sizes, bf16
    python benchmarks/speech_latency.py --preset debug --seconds 5 --batch 2   # CPU smoke run

Rows (median of --repeats after --warmup, CUDA-synchronised; the inputs are log-mel frames already on the device):
    ours, batch 1        `SpeechEncoder` ("paper": 24 layers, 1536 wide, 24 rotary heads, FFN 4096, kernel 7) +
                         `SpeechAdapter` (conv k3 s2 to 3072, one layer, to the 8B trunk's 4096) on one utterance
    peer, batch 1        torchaudio.models.Conformer at the same sizes (BatchNorm in its conv module, no rotary
                         position, no adapter) behind the same 320 -> 1536 stacking projection
    ours / peer, batch B the same on B utterances of the same length
    ours, CUDA graph     (GPU only) ours at batch 1 captured once as a CUDA graph and replayed: the same kernels
                         without the CPU's launch cost, which bounds the eager batch-1 row
    ours, compiled       (GPU only) ours at batch 1 through torch.compile, as `Assistant(..., compile=True)` runs the
                         speech parts (`Generator`: the model's `encoders()` compiled with the default mode)
"x real time" is audio seconds per wall second; "ratio" is the peer's time over ours (> 1: ours is faster). The log-mel
front end (`encoders.audio.log_mel`) is timed on its own row, on the device of the run.
"""

from __future__ import annotations

import argparse
import json

import torch
from speech_peer import Peer, timed

from adapters.speech import SpeechAdapter, SpeechAdapterConfig
from encoders.audio import SAMPLE_RATE, log_mel
from encoders.speech import SpeechEncoder, SpeechEncoderConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper", help="speech encoder preset (paper, debug)")
    parser.add_argument("--trunk-dim", type=int, default=4096, help="the adapter's output width (8B: 4096)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--batch", type=int, default=32, help="utterances in the batched rows")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = SpeechEncoderConfig.preset(args.preset)
    adapter_config = SpeechAdapterConfig() if args.preset == "paper" else SpeechAdapterConfig(
        in_dim=config.dim, dim=config.dim, n_heads=config.n_heads, ffn_dim=config.ffn_dim)
    torch.manual_seed(0)
    encoder = SpeechEncoder(config).to(device, dtype).eval()
    adapter = SpeechAdapter(adapter_config, args.trunk_dim).to(device, dtype).eval()
    peer = Peer(config).to(device, dtype).eval()
    n = int(args.seconds * SAMPLE_RATE)
    wave = torch.randn(n, device=device) * 0.1
    rows = []

    with torch.inference_mode():
        seconds = timed(lambda: log_mel(wave), args.repeats, args.warmup, device)
        rows.append({"row": "log-mel, batch 1", "ms": seconds * 1e3, "x_real_time": args.seconds / seconds})
        mel = log_mel(wave)[0].to(dtype)  # (1, T, 80)
        for batch in (1, args.batch):
            x = mel.expand(batch, -1, -1).contiguous()
            lengths = torch.full((batch,), mel.shape[1], device=device)
            ours = timed(lambda x=x, lengths=lengths: adapter(*encoder(x, lengths)), args.repeats, args.warmup, device)
            theirs = timed(lambda x=x, lengths=lengths: peer(x, lengths), args.repeats, args.warmup, device)
            for name, s in (("ours", ours), ("peer", theirs)):
                rows.append({"row": f"{name}, batch {batch}", "ms": s * 1e3, "x_real_time": batch * args.seconds / s,
                             "ratio": theirs / s if name == "ours" else None})
        if device.type == "cuda":
            length = torch.full((1,), mel.shape[1], device=device)  # made before the capture: no copy inside it
            rows.append(_graph_row(lambda: adapter(*encoder(mel, length)), args))
            compiled_encoder, compiled_adapter = torch.compile(encoder), torch.compile(adapter)
            seconds = timed(lambda: compiled_adapter(*compiled_encoder(mel, length)), args.repeats, args.warmup,
                            device)
            # Fused kernels round bf16 differently from eager ones: the row says by how much.
            eager, fused = adapter(*encoder(mel, length))[0], compiled_adapter(*compiled_encoder(mel, length))[0]
            rows.append({"row": "ours, compiled, batch 1", "ms": seconds * 1e3, "x_real_time": args.seconds / seconds,
                         "max_diff_vs_eager": ((fused - eager).abs().max() / eager.abs().max()).item()})
    params = {"encoder": sum(p.numel() for p in encoder.parameters()),
              "adapter": sum(p.numel() for p in adapter.parameters()),
              "peer": sum(p.numel() for p in peer.parameters())}
    print(f"{device} {dtype}, {args.seconds:g} s of audio, preset {args.preset}, parameters {params}")
    for r in rows:
        ratio = f"  ratio {r['ratio']:.2f}" if r.get("ratio") else ""
        if "max_diff_vs_eager" in r:
            ratio += f"  max |compiled - eager| / max |eager| {r['max_diff_vs_eager']:.1e}"
        print(f"{r['row']:<18} {r['ms']:9.2f} ms  {r['x_real_time']:10.0f} x real time{ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "dtype": str(dtype), "seconds": args.seconds, "params": params,
                       "rows": rows}, f, indent=1)


def _graph_row(step, args) -> dict:
    """`step` captured as one CUDA graph (after warm-up on a side stream, as torch.cuda.graphs asks) and timed as
    replays; checks that a replay gives the eager outputs."""
    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(args.warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.testing.assert_close(captured[0], eager[0], rtol=0, atol=0)
    seconds = timed(graph.replay, args.repeats, args.warmup, torch.device("cuda"))
    return {"row": "ours, CUDA graph, batch 1", "ms": seconds * 1e3, "x_real_time": args.seconds / seconds}


if __name__ == "__main__":
    main()
