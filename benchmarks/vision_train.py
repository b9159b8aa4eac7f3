"""Stage `image-adapter` training step on one GPU, Llama 3.2 11B-Vision layout: text tokens/s and peak memory,
against transformers' MllamaForConditionalGeneration on the same random weights, in the same run.

    python benchmarks/vision_train.py --vision trained     # the paper's default: the ViT trains with the adapter
    python benchmarks/vision_train.py --vision frozen      # only projection + cross-attention (+ media rows)
    python benchmarks/vision_train.py --device cpu         # tiny layout, same table

Batch: 4 samples of 512 text tokens, one 4-tile 560-px image each (<|image|> after the first token), loss on every
text token. Both sides get the same precision policy, the one the training loop applies: frozen weights stored in
bf16, trainable ones in fp32 (master weights, fp32 gradients, fused AdamW), compute under bf16 autocast. Ours runs
the loop's own pieces (`cast_frozen`, `prepare_model` with per-block torch.compile and the stage's choice of
activation-checkpointed blocks, `build_optimizer`); the peer runs eager, with transformers' gradient checkpointing
only where it would not fit otherwise (`--peer-checkpointing`).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.nn.functional as F
from mllama_layout import build_random, sync, to_transformers

from encoders.image_transform import Images
from encoders.vision import tile_mask_from_ids
from mm_llama.checkpoints.mllama_hf import hf_mllama_config
from mm_llama.media import Media
from mm_llama.model import MMLlama
from mm_llama.train.distributed import Runtime, prepare_model
from mm_llama.train.image_adapter import checkpointed_blocks, training_blocks
from mm_llama.train.loop import TrainConfig, build_optimizer, cast_frozen

IGNORE = -100


def build(device: torch.device, gpu: bool, train_vision: bool) -> MMLlama:
    """Our model as the stage builds it (fp32; trunk, and if asked the ViT, frozen) in transformers' semantics, so
    that the two first losses must agree: the same work on the same weights."""
    model = build_random(device, gpu, hf_semantics=True)
    model.trunk.requires_grad_(False)
    model.vision.requires_grad_(train_vision)
    return model


def make_batch(model: MMLlama, device: torch.device, batch: int, seq: int) -> dict:
    v = model.vision.config
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(10, model.trunk.config.vocab_size, (batch, seq + 1), generator=g)
    tokens[:, 1] = model.image_id
    labels = tokens.clone()
    labels[:, 1] = IGNORE  # the image token is never a target
    pixels = torch.randn(batch, 1, v.max_tiles, 3, v.tile_size, v.tile_size, generator=g)
    ratio = torch.full((batch, 1), 6)  # every image 2 x 2 tiles
    images = Images(pixels, ratio, tile_mask_from_ids(ratio, v.max_tiles), [1] * batch)
    return {"tokens": tokens.to(device), "labels": labels.to(device), "images": images.to(device)}


def hf_model(model: MMLlama, device: torch.device, train_vision: bool):
    """transformers' Mllama with our weights: frozen tensors bf16, trainable ones fp32, the same split as ours."""
    config = hf_mllama_config(model.config, torch.float32)
    cross_layers = {f"model.language_model.layers.{i}." for i in config["text_config"]["cross_attention_layers"]}
    trainable = ("model.multi_modal_projector.", *cross_layers, *(("model.vision_model.",) if train_vision else ()))
    hf = to_transformers(model, device, lambda name: torch.float32 if name.startswith(trainable) else torch.bfloat16)
    for name, p in hf.named_parameters():
        p.requires_grad_(name.startswith(trainable))
    return hf.train()


def train_steps(loss_fn, params: list[torch.nn.Parameter], optimizer, device: torch.device, warmup: int,
                steps: int) -> tuple[float, float, float]:
    """Median seconds per step after `warmup` steps, peak GiB allocated, and the first step's loss."""
    times, first = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
        value = loss.item()
        first = value if first is None else first
        print(f"    step {i}: {times[-1]:.3f} s, loss {value:.4f}", flush=True)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times[warmup:]), peak, first


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vision", choices=("trained", "frozen"), default="trained")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--checkpointing", choices=("stage", "none"), default=None,
                        help="ours: the stage's activation checkpointing or none (default: stage when the ViT trains)")
    parser.add_argument("--peer-checkpointing", choices=("auto", "on", "off"), default="auto",
                        help="transformers' gradient checkpointing (auto: only if the peer runs out of memory)")
    parser.add_argument("--skip", default="", help="comma-separated: ours, hf")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    train_vision = args.vision == "trained"
    skip = set(filter(None, args.skip.split(",")))
    checkpointing = args.checkpointing or ("stage" if train_vision else "none")
    cfg = TrainConfig(lr=1e-5, weight_decay=0.1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)
    rows = []

    if "ours" not in skip:
        model = build(device, gpu, train_vision)
        batch = make_batch(model, device, args.batch_size, args.seq_len)
        if gpu:
            cast_frozen(model, torch.bfloat16)
        checkpointed = checkpointed_blocks(model, train_vision) if checkpointing == "stage" else []
        prepare_model(model, training_blocks(model), Runtime(0, 1, device, False), bf16=gpu,
                      checkpointed=checkpointed, compile=gpu, cpu_offload=False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(model, cfg, device)

        def ours_loss():
            with autocast:
                logits = model(batch["tokens"][:, :-1], Media(images=batch["images"]))
            return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                   ignore_index=IGNORE)

        label = f"mm-llama ({'compiled' if gpu else 'eager'}{', ViT checkpointed' if checkpointed else ''})"
        print(f"  {label}: {sum(p.numel() for p in params):,} trainable parameters", flush=True)
        rows.append((label, *train_steps(ours_loss, params, optimizer, device, args.warmup, args.steps)))
        del model, optimizer, params, ours_loss
        free()

    if "hf" not in skip:
        model = build(device, gpu, train_vision)
        batch = make_batch(model, device, args.batch_size, args.seq_len)
        hf = hf_model(model, device, train_vision)
        if not gpu:
            hf.float()
        del model
        free()
        params = [p for p in hf.parameters() if p.requires_grad]
        optimizer = build_optimizer(hf, cfg, device)  # the same AdamW groups as ours
        tokens, labels = batch["tokens"][:, :-1], batch["labels"][:, 1:]
        b, t = tokens.shape
        images = batch["images"]
        n_tiles = images.pixel_values.shape[2]
        cross = torch.ones(b, t, 1, n_tiles, dtype=torch.long, device=device)
        cross[:, :1] = 0  # the first token comes before the image
        hf_inputs = dict(input_ids=tokens, pixel_values=images.pixel_values,
                         aspect_ratio_ids=images.aspect_ratio_ids,
                         aspect_ratio_mask=torch.ones(b, 1, n_tiles, dtype=torch.long, device=device),
                         cross_attention_mask=cross)

        def hf_loss():
            with autocast:
                logits = hf(**hf_inputs).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)

        modes = {"auto": (False, True), "on": (True,), "off": (False,)}[args.peer_checkpointing]
        for checkpoint in modes:
            if checkpoint:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            label = f"transformers (eager{', checkpointing' if checkpoint else ''})"
            try:
                rows.append((label, *train_steps(hf_loss, params, optimizer, device, args.warmup, args.steps)))
                break
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                free()
                print(f"  {label}: out of memory", flush=True)
                rows.append((label, float("nan"), float("nan"), float("nan")))

    tokens_per_step = args.batch_size * args.seq_len
    peer = next((r for r in rows if r[0].startswith("transformers") and r[1] == r[1]), None)
    print(f"\n{'H200' if gpu else 'CPU'}, {torch.__version__}, ViT {args.vision}, batch {args.batch_size} x "
          f"{args.seq_len} text tokens, one 4-tile image each")
    print("| implementation | s/step | text tok/s | x transformers | peak GiB | first loss |")
    print("|---|---|---|---|---|---|")
    for label, seconds, peak, loss in rows:
        rate = tokens_per_step / seconds
        ratio = (peer[1] / seconds) if peer else float("nan")
        print(f"| {label} | {seconds:.3f} | {rate:,.0f} | {ratio:.2f} | {peak:.1f} | {loss:.4f} |")


if __name__ == "__main__":
    main()
