"""The `mm-llama` command: ask streams a chat answer, convert writes the other format, errors exit 2 cleanly."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from conftest import composed, llama3_tokenizer_path, make_hf_checkpoint
from mm_llama.checkpoints import load_llama
from mm_llama.generate import Generator, Sampling
from mm_llama.tokenizer import Tokenizer, write_ranks


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
    model = composed(load_llama(path, dtype=torch.float32))
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
    for tokenizer in (["--tokenizer", str(llama3_tokenizer_path())], []):  # the missing directory is what is said
        result = mm_llama("ask", "--checkpoint", str(missing), *tokenizer, "hi")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert str(missing) in result.stderr and "not a checkpoint directory (does not exist)" in result.stderr
        assert "params.json" in result.stderr and "mm_llama.json" in result.stderr

    hf_dir, _ = hf_checkpoint
    result = mm_llama("ask", "--checkpoint", str(hf_dir), "hi")
    assert result.returncode == 2 and "no tokenizer.model" in result.stderr and "Traceback" not in result.stderr

    result = mm_llama("convert", "--input", str(hf_dir), "--output", str(hf_dir))
    assert result.returncode == 2 and "already exists" in result.stderr


def test_ask_with_an_image_answers_from_every_vision_format(tmp_path):
    """One path for every checkpoint kind: a Llama 3.2 Vision model as Hugging Face saves it, converted to Meta's
    format (two model-parallel shards) and to mm-llama's; each answers the same, and a text-only checkpoint refuses
    the image with a clear error."""
    from PIL import Image
    from test_mllama_parity import tiny_mllama

    from mm_llama.checkpoints import convert_checkpoint

    hf, _ = tiny_mllama(seed=2, vocab_size=512)  # a byte-level tokenizer: 256 ranks + 256 specials
    hf.save_pretrained(tmp_path / "hf")
    write_ranks(tmp_path / "hf" / "tokenizer.model", {bytes([b]): b for b in range(256)})
    convert_checkpoint(tmp_path / "hf", tmp_path / "meta", to="meta", n_shards=2)
    convert_checkpoint(tmp_path / "hf", tmp_path / "ours", to="ours")
    picture = tmp_path / "square.png"
    Image.new("RGB", (60, 40), (30, 30, 200)).save(picture)
    answers = {}
    for fmt in ("hf", "meta", "ours"):
        result = mm_llama("ask", "--checkpoint", str(tmp_path / fmt), "--image", str(picture),
                          "--max-new-tokens", "6", "What colour is the square?")
        assert result.returncode == 0, (fmt, result.stderr)
        answers[fmt] = result.stdout
    from mm_llama.model import MMLlama

    expected = MMLlama.from_pretrained(tmp_path / "hf", dtype=torch.float32).ask(
        "What colour is the square?", image=str(picture), max_new_tokens=6)
    assert len(expected) > 0 and answers == {fmt: expected + "\n" for fmt in answers}

    text_only = tmp_path / "text"
    make_hf_checkpoint(text_only, vocab_size=512)
    write_ranks(text_only / "tokenizer.model", {bytes([b]): b for b in range(256)})
    result = mm_llama("ask", "--checkpoint", str(text_only), "--image", str(picture), "?")
    assert result.returncode == 2 and "no image encoder" in result.stderr and "Traceback" not in result.stderr
