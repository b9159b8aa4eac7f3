"""FSDP2 under torchrun, on the CPU (gloo): two processes train exactly like one with the same global batch, and a
sharded run resumes exactly. (The GPU figures of the same code are in benchmarks/train_lm.py.)"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mm_llama.data.pack import pack
from mm_llama.data.world_tokenizer import write_world_tokenizer
from mm_llama.train.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repeated_corpus(tmp_path_factory) -> Path:
    """Every document the same: ranks read different shards, so only then are the global batches identical."""
    root = tmp_path_factory.mktemp("fsdp")
    doc = "The red circle is left of the blue square. There are two green triangles. " * 3
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": doc}) + "\n" for _ in range(64)))
    pack("text", root / "docs.jsonl", root / "corpus", shard_size=16)
    write_world_tokenizer(root / "corpus" / "tokenizer.model")  # the debug preset's 768 words
    return root / "corpus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(n: int, corpus: Path, run: Path, *extra: str) -> list[str]:
    """Train the debug trunk with n CPU processes (global batch 4)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "mm_llama.cli", "train", "lm", "--config", str(REPO / "configs" / "demo" / "lm.yaml"),
            "--model=debug", f"--data.shards={corpus}", f"--data.tokenizer={corpus / 'tokenizer.model'}",
            "--data.seq_len=64", f"--data.batch_size={4 // n}", "--data.num_workers=0", f"--train.out_dir={run}",
            "--train.steps=6", "--train.lr=3e-3", "--train.warmup_steps=2", "--train.log_every=1",
            "--train.checkpoint_every=3", "--train.device=cpu", *extra]


ENV = os.environ | {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def logged_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


def torchrun(n: int, corpus: Path, run: Path, *extra: str) -> dict[int, float]:
    """Train with n CPU processes; returns step -> loss from the run's log."""
    result = subprocess.run(torchrun_command(n, corpus, run, *extra), capture_output=True, text=True, timeout=240,
                            cwd=REPO, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{n} rank(s)" in result.stdout
    return logged_losses(run)


def test_two_processes_train_like_one_and_resume_exactly_after_a_sigterm_to_the_job(repeated_corpus, tmp_path):
    one = torchrun(1, repeated_corpus, tmp_path / "one")
    assert sorted(one) == list(range(1, 7))
    assert one[6] < one[1] - 0.5  # it learns
    # The whole job gets SIGTERM, as SLURM, Kubernetes or `timeout` send it: torchrun's agent, both ranks and their
    # DataLoader workers. The ranks agree on the step, write one checkpoint and stop.
    run, workers = tmp_path / "two", "--data.num_workers=1"
    job = subprocess.Popen(torchrun_command(2, repeated_corpus, run, workers), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, cwd=REPO, env=ENV, start_new_session=True)
    lines = []
    for line in job.stdout:
        lines.append(line)
        if line.startswith("step 1:"):
            os.killpg(job.pid, signal.SIGTERM)
            break
    output = "".join(lines) + job.communicate(timeout=120)[0]
    stopped = [line for line in output.splitlines() if line.startswith("stopped by SIGTERM at step")]
    assert len(stopped) == 1 and "DataLoader worker" not in output, output
    step = int(stopped[0].split("step ")[1].split(" ")[0])
    assert 1 <= step < 6 and latest_checkpoint(run).name == f"step_{step:08d}", output
    two = torchrun(2, repeated_corpus, run, workers, "--resume")
    assert sorted(two) == list(range(1, 7))
    assert all(abs(one[s] - two[s]) <= 1e-5 for s in one), (one, two)


def test_image_adapter_trains_sharded_with_a_frozen_trunk(tmp_path):
    """FSDP2 with frozen (trunk) and trainable (ViT, projection, cross blocks) parameters mixed in one model."""
    from mm_llama.checkpoints.ours import read_index, read_safetensors
    from mm_llama.data.synth_image import synth_image
    from mm_llama.model import MMLlama

    synth_image(tmp_path / "img", 32, seed=0, shard_size=8)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "mm_llama.cli", "train", "image-adapter", "--config",
               str(REPO / "configs" / "demo" / "image_adapter.yaml"), "--trunk=null", "--trunk_preset=debug",
               "--adapter.n_layers=2",  # the demo config's 3 blocks need the demo trunk's 6 layers; debug has 2
               f"--data.shards={tmp_path / 'img'}", f"--data.tokenizer={tmp_path / 'img' / 'tokenizer.model'}",
               "--data.num_workers=0", "--data.batch_size=2", f"--train.out_dir={tmp_path / 'run'}",
               "--train.steps=3", "--train.log_every=1", "--train.device=cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO,
                            env=os.environ | {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 rank(s)" in result.stdout
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(5.0 < loss < 7.0 for loss in losses)
    ckpt = latest_checkpoint(tmp_path / "run")
    model = MMLlama.from_pretrained(ckpt, dtype=None)  # the sharded run's checkpoint loads as one model
    # Every parameter but the trunk's trains (and only those reach the optimizer).
    trainable = [n for n, _ in model.named_parameters() if not n.startswith("trunk.")]
    assert f"] {len(trainable)} trainable tensors" in result.stdout
    adapter = read_safetensors(ckpt / read_index(ckpt)["parts"]["image_adapter"]["weights"])
    assert any(k.endswith("gate_attn") and v.abs().item() > 0 for k, v in adapter.items())  # gates moved off 0


def test_vision_pretrain_two_processes_give_the_global_contrastive_loss(tmp_path):
    """Two ranks gather each other's embeddings (with gradients): their first loss is the one-process CLIP loss of
    the concatenated global batch, so every caption of every rank is a negative."""
    import torch
    from open_clip.loss import ClipLoss

    from mm_llama.config import from_dict, to_yaml
    from mm_llama.data.synth_image import synth_image
    from mm_llama.train.distributed import Runtime
    from mm_llama.train.vision_pretrain import VisionPretrainStage, VisionPretrainStageConfig

    synth_image(tmp_path / "img", 32, seed=0, shard_size=8)
    config = from_dict(VisionPretrainStageConfig, {
        "vision": {"preset": "debug", "tile_size": 56, "max_tiles": 1}, "text_model": "ViT-S-32",
        "text_cfg": {"width": 64, "heads": 2, "layers": 2}, "embed_dim": 32,
        "data": {"shards": str(tmp_path / "img"), "tokenizer": str(tmp_path / "img" / "tokenizer.model"),
                 "tile_size": 56, "max_tiles": 1, "batch_size": 4, "shuffle_buffer": 8, "num_workers": 0,
                 "task": "caption"},
        "train": {"out_dir": str(tmp_path / "run"), "steps": 3, "lr": 1e-3, "warmup_steps": 1, "log_every": 1,
                  "device": "cpu"}})
    (tmp_path / "config.yaml").write_text(to_yaml(config))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "mm_llama.cli", "train", "vision-pretrain", "--config",
               str(tmp_path / "config.yaml")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO,
                            env=os.environ | {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 rank(s)" in result.stdout
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]

    # The same first step in one process: the initial weights (the loop's seed) on both ranks' first batches.
    stage = VisionPretrainStage(config)
    torch.manual_seed(config.train.seed)
    model = stage.build(Runtime(0, 1, torch.device("cpu"), False))
    batches = [next(stage.batches(Runtime(r, 2, torch.device("cpu"), False), 0)) for r in (0, 1)]
    with torch.no_grad():
        image, text, scale = model(torch.cat([b["images"].pixel_values for b in batches]),
                                   torch.cat([b["images"].aspect_ratio_ids for b in batches]),
                                   torch.cat([b["text"] for b in batches]))
        expected = ClipLoss()(image, text, scale).item()
        # Without the gather each rank would see only its own 4 captions: a different loss.
        local = sum(ClipLoss()(image[h], text[h], scale).item() for h in (slice(0, 4), slice(4, 8))) / 2
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    assert abs(losses[0] - expected) < 1e-5, (losses[0], expected)
    assert abs(local - expected) > 1e-2, (local, expected)
