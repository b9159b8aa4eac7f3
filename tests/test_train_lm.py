"""Stage `lm` on the debug preset (CPU, fp32): loss falls, exact resume, the non-finite guard, atomic checkpoints,
frozen parameters, SIGTERM, and a trained trunk that loads and generates."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import Crash, crash_after
from mm_llama.checkpoints import load_llama
from mm_llama.config import load_config
from mm_llama.errors import TrainingError
from mm_llama.generate import Sampling, generate
from mm_llama.train.checkpoint import latest_checkpoint, list_checkpoints
from mm_llama.train.lm import LMStage, LMStageConfig
from mm_llama.train.loop import train

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo" / "lm.yaml"


def overrides(corpus: Path, run: Path, **train) -> list[str]:
    """The demo config shrunk to the debug preset: seconds on a CPU."""
    args = ["--model=debug", f"--data.shards={corpus}", f"--data.tokenizer={corpus / 'tokenizer.model'}",
            "--data.seq_len=64", "--data.batch_size=8", "--data.num_workers=0", "--data.shuffle_buffer=50",
            f"--train.out_dir={run}", "--train.steps=30", "--train.lr=3e-3", "--train.warmup_steps=3",
            "--train.checkpoint_every=10", "--train.log_every=5", "--train.device=cpu"]
    return args + [f"--train.{k}={v}" for k, v in train.items()]


def stage_for(corpus, run, **train) -> LMStage:
    return LMStage(load_config(LMStageConfig, DEMO_CONFIG, overrides(corpus, run, **train)))


def test_loss_falls_and_the_trunk_loads_and_generates(corpus, tmp_path):
    stage = stage_for(corpus, tmp_path / "run")
    result = train(stage, stage.config.train)
    first, last = sum(result.losses[s] for s in range(1, 6)) / 5, sum(result.losses[s] for s in range(26, 31)) / 5
    assert first > 5.5  # ~ln(768) = 6.6 for random init
    assert last < 0.6 * first, (first, last)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [20, 30]  # the demo config keeps the last 2
    # The last checkpoint is a trunk on its own: same logits as the trained model, and it answers in English text.
    trunk = load_llama(latest_checkpoint(tmp_path / "run"), dtype=torch.float32)
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(trunk(tokens), result.model(tokens))
    from mm_llama.model import MMLlama
    from mm_llama.tokenizer import Tokenizer

    tok = Tokenizer.from_file(latest_checkpoint(tmp_path / "run") / "tokenizer.model")
    model = MMLlama.from_pretrained(latest_checkpoint(tmp_path / "run"), dtype=torch.float32)  # the composed view
    out = generate(model, [tok.encode("The red circle", bos=True, eos=False)], Sampling(max_new_tokens=30))[0]
    # Words until the turn ends: <|eot_id|>, end of text, or (after only 30 steps) the header of the next turn.
    ends = (tok.eos_id, tok.special_tokens["<|eot_id|>"], tok.special_tokens["<|start_header_id|>"])
    stops = [i for i, t in enumerate(out) if t in ends]
    text = out[: stops[0]] if stops else out
    assert len(text) >= 2 and all(t < tok.n_base for t in text), tok.decode(out)  # no other special token
    assert re.fullmatch(r"[ -~\n]+", tok.decode(text)), tok.decode(out)
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 6 and '"samples_skipped": 0' in log[-1] and '"tokens_per_s"' in log[-1]


def test_resume_gives_the_same_losses(corpus, tmp_path):
    full = train(s := stage_for(corpus, tmp_path / "full", steps=20, grad_accum=2), s.config.train)
    crashed = crash_after(stage_for(corpus, tmp_path / "part", steps=20, grad_accum=2), n_batches=2 * 13)
    with pytest.raises(Crash):
        train(crashed, crashed.config.train)
    assert [s for s, _ in list_checkpoints(tmp_path / "part")] == [10]  # steps 11-13 were lost with the process
    resumed = train(s := stage_for(corpus, tmp_path / "part", steps=20, grad_accum=2), s.config.train, resume=True)
    assert sorted(resumed.losses) == list(range(11, 21))
    for step in range(11, 21):
        assert abs(resumed.losses[step] - full.losses[step]) <= 1e-5, step
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_resume_and_fresh_start_guard_the_run_directory(corpus, tmp_path):
    stage = stage_for(corpus, tmp_path / "run", steps=10)
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(stage, stage.config.train, resume=True)
    train(stage, stage.config.train)
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(stage_for(corpus, tmp_path / "run", steps=10), stage.config.train)


def test_non_finite_loss_stops_before_the_optimizer_step(corpus, tmp_path):
    stage = stage_for(corpus, tmp_path / "run", checkpoint_every=4)
    built, loss, calls = [], stage.loss, [0]

    def build(runtime):
        built.append(LMStage.build(stage, runtime))
        return built[0]

    def poisoned(model, batch):
        calls[0] += 1
        value = loss(model, batch)
        return value * float("nan") if calls[0] == 5 else value

    stage.build, stage.loss = build, poisoned
    with pytest.raises(TrainingError, match=r"step 5: loss nan .* stopped before the optimizer step"):
        train(stage, stage.config.train)
    after_step_4 = load_llama(tmp_path / "run" / "checkpoints" / "step_00000004", dtype=torch.float32).state_dict()
    for name, value in built[0].state_dict().items():
        assert torch.equal(value, after_step_4[name]), name


def test_frozen_parameters_stay_bit_identical(corpus, tmp_path):
    stage = stage_for(corpus, tmp_path / "run", steps=5)
    build = stage.build

    def build_partly_frozen(runtime):
        model = build(runtime)
        model.layers[0].requires_grad_(False)
        model.tok_embeddings.requires_grad_(False)
        return model

    stage.build = build_partly_frozen
    result = train(stage, stage.config.train)
    from mm_llama.train.distributed import init_runtime

    torch.manual_seed(stage.config.train.seed)  # the loop's seed: the same initial weights
    reference = build(init_runtime("cpu")).state_dict()
    trained = result.model.state_dict()
    for name in trained:
        frozen = name.startswith(("layers.0.", "tok_embeddings."))
        assert torch.equal(trained[name], reference[name]) == frozen, name


CRASHING_WRITER = """
import sys, time
import mm_llama.train.lm as lm
real = lm.write_ours
calls = [0]
def slow_write(out, **kw):
    calls[0] += 1
    real(out, **kw)
    if calls[0] == 2:  # the second checkpoint: files half written, then the process hangs until it is killed
        (out / "WRITING").write_text("x")
        time.sleep(120)
lm.write_ours = slow_write
lm.main(sys.argv[1], sys.argv[2:])
"""


def test_kill_during_checkpoint_writing_leaves_the_previous_checkpoint_usable(corpus, tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASHING_WRITER))
    child = subprocess.Popen([sys.executable, str(script), str(DEMO_CONFIG), *overrides(corpus, run, steps=20)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((run / "checkpoints").glob(".tmp-step_00000020-*/WRITING")) and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    leftovers = list((run / "checkpoints").glob(".tmp-step_00000020-*"))
    assert leftovers and (leftovers[0] / "trunk.safetensors").is_file()  # killed mid-write: a partial directory
    assert latest_checkpoint(run).name == "step_00000010"  # ... that nothing mistakes for a checkpoint
    assert load_llama(latest_checkpoint(run), dtype=torch.float32).config.vocab_size == 768
    resumed = train(s := stage_for(corpus, run, steps=20), s.config.train, resume=True)
    full = train(s := stage_for(corpus, tmp_path / "full", steps=20), s.config.train)
    assert all(abs(resumed.losses[k] - full.losses[k]) <= 1e-5 for k in range(11, 21))


def test_command_line_synth_train_ask(tmp_path):
    """The documented path: data synth, train lm with overrides, then ask the trained trunk."""
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mm_llama.cli", *args], capture_output=True, text=True,
                              cwd=REPO, timeout=300, env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})

    data = tmp_path / "text"
    result = cli("data", "synth", "--kind", "text", "--out", str(data), "--n", "300", "--shard-size", "100")
    assert result.returncode == 0 and "wrote 3 shard(s)" in result.stdout, result.stderr
    result = cli("train", "lm", "--config", str(DEMO_CONFIG), *overrides(data, tmp_path / "run", steps=4))
    assert result.returncode == 0, result.stderr
    assert "model:" in result.stdout and "trunk checkpoint:" in result.stdout  # resolved config printed first
    ckpt = latest_checkpoint(tmp_path / "run")
    assert "steps: 4" in (ckpt / "config.yaml").read_text()
    result = cli("ask", "--checkpoint", str(ckpt), "--max-new-tokens", "5", "Which shape is red?")
    assert result.returncode == 0 and len(result.stdout) > 1, result.stderr
    result = cli("train", "lm", "--config", str(DEMO_CONFIG), "--train.stepz=4")
    assert result.returncode == 2 and "train.stepz" in result.stderr and "Traceback" not in result.stderr


def test_cast_frozen_keeps_trainables_fp32_and_buffers_untouched():
    import torch

    from mm_llama.llama import Llama, LlamaConfig
    from mm_llama.train.loop import cast_frozen

    model = Llama(LlamaConfig.preset("debug"))
    model.layers[0].requires_grad_(False)
    model.tok_embeddings.requires_grad_(False)
    buffers = {name: b.dtype for name, b in model.named_buffers()}
    cast_frozen(model, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if n.startswith(("layers.0.", "tok_embeddings.")))
    assert all(d == torch.float32 for n, d in dtypes.items() if n.startswith("layers.1."))
    assert {name: b.dtype for name, b in model.named_buffers()} == buffers


def test_lr_scales_multiply_the_named_parameters_learning_rate_and_refuse_unknown_names():
    from mm_llama.errors import ConfigError
    from mm_llama.llama import Llama, LlamaConfig
    from mm_llama.train.loop import TrainConfig, build_optimizer, set_lr

    model = Llama(LlamaConfig.preset("debug"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = TrainConfig(lr=1e-3, weight_decay=0.0, lr_scales={"layers.0.attention.wq.weight": 30.0, "norm.weight": 5})
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    set_lr(optimizer, 1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    # Adam's first step moves every element by lr (gradient / sqrt(gradient^2)): the scale multiplies it.
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in model.named_parameters()}
    assert moved["layers.0.attention.wq.weight"] == pytest.approx(30e-3, rel=1e-4)
    assert moved["layers.1.attention.wq.weight"] == pytest.approx(1e-3, rel=1e-4)
    assert moved["norm.weight"] == pytest.approx(5e-3, rel=1e-4)  # "norm.weight" is the final norm's name
    assert moved["layers.0.attention_norm.weight"] == pytest.approx(1e-3, rel=1e-4)
    with pytest.raises(ConfigError, match=r"lr_scales names \['moment_mix'\], which no trainable parameter"):
        build_optimizer(model, TrainConfig(lr_scales={"moment_mix": 30.0}), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"lr_scales\['wq.weight'\] must be a finite number > 0, got -1"):
        TrainConfig(lr_scales={"wq.weight": -1})


def test_assistant_weight_flags_exactly_the_assistant_messages_and_weighs_their_loss(corpus, tmp_path):
    from mm_llama.data.text import _PadRows, _TokenRow
    from mm_llama.tokenizer import Tokenizer

    tok = Tokenizer.from_file(corpus / "tokenizer.model")
    messages = [{"role": "user", "content": "Where is the star?"}, {"role": "assistant", "content": "At the top."}]
    ids, flags = _TokenRow(tok, 512)(messages)
    assert ids == tok.encode_dialog(messages, add_generation_prompt=False)
    n_assistant = len(tok.encode_message("assistant", "At the top."))
    assert flags == [False] * (len(ids) - n_assistant) + [True] * n_assistant
    assert _TokenRow(tok, 512)("plain text")[1] == [False] * len(tok.encode("plain text", bos=True, eos=True))
    batch = _PadRows(tok.pad_id)([(ids, flags), _TokenRow(tok, 512)("plain text")])
    assert batch["assistant"].sum() == n_assistant and not batch["assistant"][1].any()

    # The loss: each target token's cross-entropy, times 3 where the target is an assistant message's token.
    stage = LMStage(load_config(LMStageConfig, DEMO_CONFIG, [*overrides(corpus, tmp_path), "--assistant_weight=3"]))
    torch.manual_seed(0)
    model = stage.build(type("R", (), {"device": torch.device("cpu")})())
    with torch.no_grad():
        weighted = stage.loss(model, batch)
        logits = model(batch["tokens"][:, :-1])
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["tokens"][:, 1:].flatten(),
                                               reduction="none").view(2, -1)
        ce = ce * batch["mask"][:, 1:]
        expected = ce.sum() + 2 * (ce * batch["assistant"][:, 1:]).sum()
    assert torch.allclose(weighted, expected, rtol=1e-5)
    with pytest.raises(Exception, match="assistant_weight must be a positive number"):
        load_config(LMStageConfig, DEMO_CONFIG, [*overrides(corpus, tmp_path), "--assistant_weight=0"])
