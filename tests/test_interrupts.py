"""Nothing lost: a run signalled the way schedulers do it (the whole process group, DataLoader workers included)
checkpoints and resumes exactly; a live run directory is refused to a second run but not left locked by a killed
one; a checkpoint that cannot be written (a file-size limit: a real EFBIG from the kernel) stops the run with a clear
error and leaves the last good checkpoint intact; a changed `train.steps` on resume keeps the schedule's length."""

import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_lm import DEMO_CONFIG, REPO, overrides

from mm_llama.checkpoints import load_llama
from mm_llama.config import load_config
from mm_llama.errors import TrainingError
from mm_llama.train.checkpoint import latest_checkpoint, list_checkpoints, load_train_state
from mm_llama.train.lm import LMStage, LMStageConfig
from mm_llama.train.loop import lr_at, train

ENV = os.environ | {"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def lm_args(corpus: Path, run: Path, **train) -> list[str]:
    """The debug trunk of test_train_lm, read by two DataLoader workers."""
    return [*overrides(corpus, run, **train), "--data.num_workers=2"]


def lm_stage(corpus: Path, run: Path, **train) -> LMStage:
    return LMStage(load_config(LMStageConfig, DEMO_CONFIG, lm_args(corpus, run, **train)))


def start_training(corpus: Path, run: Path, *extra: str, preexec_fn=None, **train) -> subprocess.Popen:
    """`mm-llama train lm` in a session (process group) of its own, as a scheduler starts a job."""
    command = [sys.executable, "-m", "mm_llama.cli", "train", "lm", "--config", str(DEMO_CONFIG),
               *lm_args(corpus, run, **train), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=ENV,
                            start_new_session=True, preexec_fn=preexec_fn)


def read_until(child: subprocess.Popen, prefix: str) -> list[str]:
    lines = []
    for line in child.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError("".join(lines))


def test_sigterm_to_the_process_group_checkpoints_and_resumes_exactly(corpus, tmp_path):
    run = tmp_path / "run"
    child = start_training(corpus, run, steps=8, log_every=1, checkpoint_every=1000)
    lines = read_until(child, "step 3:")
    os.killpg(child.pid, signal.SIGTERM)  # every process of the job: the main one and its DataLoader workers
    output = "".join(lines) + child.communicate(timeout=120)[0]
    assert child.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and "DataLoader worker" not in output
    stopped = [line for line in output.splitlines() if line.startswith("stopped by SIGTERM at step")]
    assert stopped and "continue with --resume" in stopped[0], output
    step = int(stopped[0].split("step ")[1].split(" ")[0])
    assert 3 <= step < 8 and latest_checkpoint(run).name == f"step_{step:08d}"

    resumed = train(s := lm_stage(corpus, run, steps=8), s.config.train, resume=True)
    full = train(s := lm_stage(corpus, tmp_path / "full", steps=8), s.config.train)
    assert sorted(resumed.losses) == list(range(step + 1, 9))
    assert all(abs(resumed.losses[k] - full.losses[k]) <= 1e-5 for k in resumed.losses), (resumed.losses, full.losses)


def test_a_live_run_directory_is_refused_and_a_killed_run_frees_it(corpus, tmp_path):
    run = tmp_path / "run"
    first = start_training(corpus, run, steps=100000, log_every=1, checkpoint_every=100000)
    try:
        read_until(first, "step 1:")
        with pytest.raises(TrainingError) as e:
            train(s := lm_stage(corpus, run, steps=2), s.config.train)
        assert f"{run} is in use by another run (pid {first.pid} on " in str(e.value)
        assert "--train.out_dir" in str(e.value)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # no handler runs: only the kernel can release the lock
        first.communicate(timeout=60)
    assert not list_checkpoints(run)
    second = train(s := lm_stage(corpus, run, steps=2), s.config.train)
    assert second.last_step == 2 and latest_checkpoint(run).name == "step_00000002"


def limit_file_size(max_bytes: int):
    def apply() -> None:  # in the child: a write past max_bytes fails with EFBIG (SIGXFSZ would kill it instead)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_last_good_one(corpus, tmp_path):
    run = tmp_path / "run"
    train(s := lm_stage(corpus, run, steps=4, checkpoint_every=2), s.config.train)
    good = latest_checkpoint(run)
    assert good.name == "step_00000004"
    # train_state.pt holds the AdamW moments (~1.3 MB for the debug trunk): over the limit, as on a full disk.
    size = (good / "train_state.pt").stat().st_size
    child = start_training(corpus, run, "--resume", steps=8, checkpoint_every=2, preexec_fn=limit_file_size(size // 2))
    output = child.communicate(timeout=120)[0]
    assert child.returncode == 2, output
    assert "Traceback" not in output
    assert "step 6: writing the checkpoint into" in output and f"The last good checkpoint is {good}" in output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", good.name]  # nothing partial
    assert load_llama(good).config.vocab_size == 768


def test_changing_steps_on_resume_keeps_the_schedule_and_says_so(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    first = lm_stage(corpus, run, steps=6, checkpoint_every=3, log_every=1)
    train(first, first.config.train)
    longer = train(s := lm_stage(corpus, run, steps=9, log_every=1), s.config.train, resume=True)
    note = capsys.readouterr().out
    assert "train.steps is 9 but the run started with 6: the learning-rate schedule keeps its length of 6" in note
    assert "steps 7-9 run at the final learning rate" in note
    assert sorted(longer.losses) == [7, 8, 9]
    # The logged learning rates follow the 6-step schedule: steps 1-6 as first run, 7-9 at its floor (lr x 0.1),
    # where a 9-step cosine would still be above it; the new checkpoint keeps the stored length.
    logged = {r["step"]: r["lr"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}
    six, nine = first.config.train, dataclasses.replace(first.config.train, steps=9)
    assert all(logged[k] == pytest.approx(lr_at(k, six), rel=1e-12) for k in range(1, 10))
    floor = six.lr * six.min_lr_ratio
    assert all(logged[k] == pytest.approx(floor) and floor < lr_at(k, nine) for k in (7, 8))
    assert load_train_state(latest_checkpoint(run))["schedule_steps"] == 6
    done = train(s := lm_stage(corpus, run, steps=5), s.config.train, resume=True)
    assert not done.losses
    assert "the run is already at step 9, train.steps is 5: nothing to train" in capsys.readouterr().out


def test_a_script_that_leaves_workers_running_exits_without_a_traceback(tmp_path):
    # The workers ignore SIGTERM except while the main process exits; they then go with status 0, since torch reports
    # any other status of a worker as "exited unexpectedly" (it did in 5 of 5 runs of this script before the fix).
    from mm_llama.data.synth_image import synth_image

    synth_image(tmp_path / "img", 600, seed=0, shard_size=150, workers=1)
    script = f"""
import time
from mm_llama.data.image import ImageDataConfig, ImageTextBatches
config = ImageDataConfig(shards={str(tmp_path / 'img')!r}, tokenizer={str(tmp_path / 'img' / 'tokenizer.model')!r},
                         tile_size=84, max_tiles=1, batch_size=64, shuffle_buffer=500, num_workers=2)
held = []  # open iterators at exit, as a script leaves them when it breaks out of its loops and ends
for _ in range(4):
    held.append(ImageTextBatches(config).batches())
    next(held[-1])
time.sleep(0.2)
print("done")
"""
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert child.returncode == 0 and child.stdout.strip() == "done", child.stderr[-2000:]
    assert "exited unexpectedly" not in child.stderr and "Traceback" not in child.stderr, child.stderr[-2000:]
