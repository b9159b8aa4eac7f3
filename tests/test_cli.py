"""The `mm-llama` command: ask streams a chat answer, convert writes the other format, errors exit 2 cleanly."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from conftest import llama3_tokenizer_path, make_hf_checkpoint
from mm_llama.checkpoints import load_llama
from mm_llama.generate import Generator, Sampling
from mm_llama.tokenizer import Tokenizer


def mm_llama(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run the installed console script (the one next to this Python), as a user would."""
    script = Path(sys.executable).with_name("mm-llama")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mm_llama.cli"]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})


def test_ask_streams_the_greedy_chat_answer(tmp_path):
    tok = Tokenizer.from_file(llama3_tokenizer_path())
    path = tmp_path / "ckpt"
    make_hf_checkpoint(path, seed=9, vocab_size=tok.n_words)
    shutil.copy(llama3_tokenizer_path(), path / "tokenizer.model")  # into the test's temp dir only
    result = mm_llama("ask", "--checkpoint", str(path), "--max-new-tokens", "12", "What is a circle?")
    assert result.returncode == 0, result.stderr
    # The same answer computed in-process: chat format, greedy, fp32 on the CPU.
    model = load_llama(path, dtype=torch.float32)
    prompt = tok.encode_dialog([{"role": "user", "content": "What is a circle?"}])
    ids = Generator(model).generate([prompt], Sampling(max_new_tokens=12), stop_tokens=tok.stop_tokens)[0]
    assert result.stdout == tok.decode(ids) + "\n"
    assert len(ids) > 0


def test_convert_writes_meta_then_hf(tmp_path, hf_checkpoint):
    hf_dir, hf_model = hf_checkpoint
    result = mm_llama("convert", "--input", str(hf_dir), "--output", str(tmp_path / "meta"))
    assert result.returncode == 0, result.stderr
    assert "wrote meta checkpoint" in result.stdout
    assert (tmp_path / "meta" / "params.json").is_file() and (tmp_path / "meta" / "consolidated.00.pth").is_file()
    tokens = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        assert (load_llama(tmp_path / "meta", dtype=torch.float32)(tokens) - hf_model(tokens).logits).abs().max() < 1e-4


def test_errors_exit_2_without_traceback(tmp_path, hf_checkpoint):
    missing = tmp_path / "no-such-dir"
    result = mm_llama("ask", "--checkpoint", str(missing), "--tokenizer", str(llama3_tokenizer_path()), "hi")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(missing) in result.stderr and "not a checkpoint directory" in result.stderr

    hf_dir, _ = hf_checkpoint
    result = mm_llama("ask", "--checkpoint", str(hf_dir), "hi")
    assert result.returncode == 2 and "no tokenizer.model" in result.stderr and "Traceback" not in result.stderr

    result = mm_llama("convert", "--input", str(hf_dir), "--output", str(hf_dir))
    assert result.returncode == 2 and "already exists" in result.stderr
