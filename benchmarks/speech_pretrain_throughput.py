"""`speech-pretrain`'s training speed (issue 12: hours of audio per GPU-hour at the paper's sizes), with torchaudio's
`Conformer` of the same size trained the same way side by side as the peer.

    python benchmarks/speech_pretrain_throughput.py --json pretrain.json              # GPU: paper sizes
    python benchmarks/speech_pretrain_throughput.py --preset debug --seconds 5 --batch 2   # CPU smoke run

One step, for both: BEST-RQ targets from the clean stacked frames (the same frozen quantizer), span masking with noise,
the encoder on the masked frames, 16 heads of 8,192 codes, cross-entropy at the wholly masked encoder frames, backward,
fused AdamW; fp32 master weights with bf16 autocast on a GPU, as the training loop (`mm_llama/train/loop.py`) runs.
Only the encoder differs: ours (`SpeechEncoder`: rotary attention through SDPA, per-frame LayerNorm in the conv
module) or the peer (torchaudio: `nn.MultiheadAttention`, BatchNorm) behind the same stacking projection. Every
utterance is --seconds long (the paper crops to 6,000 frames, 60 s). "audio h / GPU h" is batch × seconds over the
median step time.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from speech_peer import Peer, timed

from encoders.best_rq import BestRQConfig, RandomProjectionQuantizer, mask_frames, span_mask, target_frames
from encoders.speech import SpeechEncoder, SpeechEncoderConfig


class Pretrained(torch.nn.Module):
    """An encoder (ours or the peer) with BEST-RQ's heads: masked mel (B, T, 80) -> logits (B, S, K, N)."""

    def __init__(self, encoder: torch.nn.Module, dim: int, best_rq: BestRQConfig):
        super().__init__()
        self.encoder = encoder
        self.heads = torch.nn.Linear(dim, best_rq.n_codebooks * best_rq.codebook_size)
        self.shape = (best_rq.n_codebooks, best_rq.codebook_size)

    def forward(self, masked: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.heads(self.encoder(masked, lengths)[0]).unflatten(-1, self.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper", help="speech encoder preset (paper, debug)")
    parser.add_argument("--seconds", type=float, default=60.0, help="every utterance's length (the paper's crop: 60)")
    parser.add_argument("--batch", type=int, default=8, help="utterances per step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config, best_rq = SpeechEncoderConfig.preset(args.preset), BestRQConfig()
    quantizer = RandomProjectionQuantizer(best_rq).to(device)
    torch.manual_seed(0)
    frames = int(args.seconds * 100) // config.stack * config.stack  # 10 ms frames, whole stacks (S equal for both)
    mel = torch.randn(args.batch, frames, config.n_mels)
    lengths = torch.full((args.batch,), frames)
    generator = torch.Generator().manual_seed(0)
    mask = span_mask(lengths, frames, best_rq, generator)
    masked = mask_frames(mel, mask, best_rq.noise_std, generator).to(device)
    targets = target_frames(mask, config.stack).to(device)
    mel, lengths = mel.to(device), lengths.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    rows = []
    for name in ("ours", "peer"):
        encoder = SpeechEncoder(config) if name == "ours" else Peer(config)
        model = Pretrained(encoder, config.dim, best_rq).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        clean = mel.reshape(args.batch, -1, config.stack * config.n_mels)  # the stacked frames (whole stacks)

        def step(model=model, optimizer=optimizer, clean=clean) -> None:
            with autocast:
                codes = quantizer(clean)  # (B, S, K), from the clean frames as the stage takes them
                logits = model(masked, lengths)
                loss = F.cross_entropy(logits[targets].flatten(0, 1).float(), codes[targets].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(step, args.repeats, args.warmup, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        rows.append({"row": name, "params": sum(p.numel() for p in encoder.parameters()), "step_ms": seconds * 1e3,
                     "audio_hours_per_gpu_hour": args.batch * args.seconds / seconds, "peak_gib": peak})
        del model, optimizer, encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows[0]["ratio"] = rows[1]["step_ms"] / rows[0]["step_ms"]  # > 1: ours trains faster
    print(f"{device}, preset {args.preset}, {args.batch} x {args.seconds:g} s per step, masked encoder frames "
          f"{targets.float().mean():.1%}")
    for r in rows:
        peak = f"  peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""
        ratio = f"  ratio {r['ratio']:.2f}" if "ratio" in r else ""
        print(f"{r['row']:<5} {r['params'] / 1e6:7.1f}M  {r['step_ms']:9.1f} ms/step  "
              f"{r['audio_hours_per_gpu_hour']:8.0f} audio h / GPU h{peak}{ratio}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "preset": args.preset, "batch": args.batch, "seconds": args.seconds,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
