"""Every value a user passes — API argument, CLI flag, config field — is checked where it enters: each bad value below
ends in an `MMLlamaError` (exit status 2 on the command line, no traceback) whose message names the value."""

import math

import numpy as np
import pytest
import torch
from test_train_lm import DEMO_CONFIG

from conftest import make_hf_checkpoint
from mm_llama.api import Assistant
from mm_llama.cli import main
from mm_llama.config import load_config
from mm_llama.data.synth_text import synth_text
from mm_llama.errors import MMLlamaError
from mm_llama.tokenizer import write_ranks
from mm_llama.train.lm import LMStageConfig


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny text-only checkpoint with a byte-level tokenizer (vocab 512)."""
    path = tmp_path_factory.mktemp("bad") / "ckpt"
    make_hf_checkpoint(path, vocab_size=512)
    write_ranks(path / "tokenizer.model", {bytes([b]): b for b in range(256)})
    return path


@pytest.fixture(scope="module")
def assistant(checkpoint):
    return Assistant.from_pretrained(checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-text")
    synth_text(out, 40, seed=0, shard_size=20)
    return out


# (keyword arguments of Assistant.ask, text the message must contain)
ASK_ROWS = [
    ({"temperature": math.nan}, "temperature must be a finite number >= 0 (0 = greedy), got nan"),
    ({"temperature": math.inf}, "temperature must be a finite number >= 0 (0 = greedy), got inf"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0 (0 = greedy), got -0.5"),
    ({"temperature": "0.7"}, "temperature must be a finite number >= 0 (0 = greedy), got '0.7'"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1, got 2.5"),
    ({"max_new_tokens": "5"}, "max_new_tokens must be an integer >= 1, got '5'"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1, got True"),
    ({"top_k": 0}, "top_k must be an integer >= 1 or None, got 0"),
    ({"top_k": 2.5}, "top_k must be an integer >= 1 or None, got 2.5"),
    ({"top_p": 0.0}, "top_p must be a number in (0, 1], got 0.0"),
    ({"top_p": math.nan}, "top_p must be a number in (0, 1], got nan"),
    ({"seed": "x"}, "seed must be an integer or None, got 'x'"),
    ({"system": 3}, "system must be a str or None, got int"),
    ({"images": "cat.jpg"}, "images must be a list of images, got str"),
    ({"image": "cat.jpg", "images": ["dog.jpg"]}, "pass image=... or images=[...], not both"),
    ({"image": "cat.jpg"}, "this model has no image encoder: it answers text only"),
]


@pytest.mark.parametrize(("kwargs", "message"), ASK_ROWS, ids=[str(r[0]) for r in ASK_ROWS])
def test_bad_ask_arguments(assistant, kwargs, message):
    with pytest.raises(MMLlamaError) as e:
        assistant.ask("What is a circle?", **kwargs)
    assert message in str(e.value)


@pytest.fixture(scope="module")
def vision_checkpoint(tmp_path_factory):
    from test_mllama_parity import tiny_mllama

    path = tmp_path_factory.mktemp("bad-vision") / "hf"
    tiny_mllama(seed=2, vocab_size=512)[0].save_pretrained(path)
    write_ranks(path / "tokenizer.model", {bytes([b]): b for b in range(256)})
    return path


@pytest.fixture(scope="module")
def vision_assistant(vision_checkpoint):
    return Assistant.from_pretrained(vision_checkpoint, dtype=torch.float32)


def test_bad_images(vision_assistant, tmp_path):
    rows = [
        ({"image": "https://example.com/cat.jpg"}, "image https://example.com/cat.jpg: URLs are not fetched; download"),
        ({"image": tmp_path / "cat.jpg"}, f"image file {tmp_path / 'cat.jpg'} does not exist"),
        ({"image": torch.zeros(3, 64, 64, dtype=torch.uint8)}, "torch tensor has shape (3, 64, 64); expected"),
        ({"image": np.zeros((8, 8, 3), dtype=np.float32)}, "numpy array has dtype float32; expected"),
        ({"images": [np.zeros((8, 8, 3), dtype=np.uint8)] * 9}, "9 images"),
    ]
    for kwargs, message in rows:
        with pytest.raises(MMLlamaError) as e:
            vision_assistant.ask("What is it?", **kwargs)
        assert message in str(e.value), (kwargs, str(e.value))


def test_bad_api_values_outside_ask(assistant, checkpoint, tmp_path):
    rows = [
        (lambda: assistant.ask(5), "question must be a str, got int"),
        (lambda: Assistant.from_pretrained(tmp_path / "nope"), f"{tmp_path / 'nope'}: not a checkpoint directory "
                                                               "(does not exist)"),
        (lambda: Assistant.from_pretrained("https://huggingface.co/meta-llama/Llama-3.1-8B"),
         "checkpoint directory https://huggingface.co/meta-llama/Llama-3.1-8B: URLs are not fetched"),
        (lambda: Assistant.from_pretrained(checkpoint, device="tpu"),
         "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"),
        (lambda: Assistant.from_pretrained(checkpoint, device="cuda:64"), "cuda:64: this machine has no such CUDA"),
        (lambda: Assistant.from_pretrained(checkpoint, dtype="bf16"), "dtype must be a floating-point torch.dtype"),
        (lambda: Assistant.from_pretrained(checkpoint, tokenizer=tmp_path / "missing.model"),
         f"cannot read tokenizer file {tmp_path / 'missing.model'}: No such file or directory"),
        (lambda: Assistant.from_pretrained(checkpoint, tokenizer="https://example.com/tokenizer.model"),
         "tokenizer https://example.com/tokenizer.model: URLs are not fetched"),
    ]
    for call, message in rows:
        with pytest.raises(MMLlamaError) as e:
            call()
        assert message in str(e.value)


def test_an_image_tensor_channels_first_is_named_once_with_a_hint():
    from encoders.image_transform import load_image

    with pytest.raises(MMLlamaError) as e:
        load_image(torch.zeros(3, 64, 64, dtype=torch.uint8))
    message = str(e.value)
    assert message.startswith("torch tensor has shape (3, 64, 64); expected") and "permute(1, 2, 0)" in message
    assert message.count("(3, 64, 64)") == 1
    with pytest.raises(MMLlamaError, match="numpy array has dtype float32"):
        load_image(np.zeros((8, 8, 3), dtype=np.float32))


# (override, text the message must contain) of the lm stage's config
CONFIG_ROWS = [
    ("--train.lr=nan", "'train.lr' must be a finite number, got 'nan'"),
    ("--train.lr=.inf", "'train.lr' must be a finite number, got inf"),
    ("--train.lr=-1e-3", "lr must be a finite number > 0, got -0.001"),
    ("--train.steps=2.5", "'train.steps' must be int, got 2.5"),
    ("--train.steps=0", "steps must be an integer >= 1, got 0"),
    ("--train.beta2=1", "beta2 must be a finite number in [0, 1), got 1.0"),
    ("--train.warmup_steps=-1", "warmup_steps must be an integer >= 0, got -1"),
    ("--train.device=tpu", "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"),
    ("--train.precision=fp8", "'train.precision' must be one of 'auto', 'fp32', 'bf16', got 'fp8'"),
    ("--data.batch_size=0", "data.batch_size must be an integer >= 1, got 0"),
    ("--data.max_skip_fraction=nan", "'data.max_skip_fraction' must be a finite number, got 'nan'"),
    ("--model.dim=abc", "'model.dim' must be int, got 'abc'"),
]


@pytest.mark.parametrize(("override", "message"), CONFIG_ROWS, ids=[r[0] for r in CONFIG_ROWS])
def test_bad_config_values(corpus, override, message):
    data = [f"--data.shards={corpus}", f"--data.tokenizer={corpus / 'tokenizer.model'}"]
    with pytest.raises(MMLlamaError) as e:
        load_config(LMStageConfig, DEMO_CONFIG, [*data, override])
    assert message in str(e.value)


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors (a value of the wrong type) exit 2 too
        code = e.code
    return code, capsys.readouterr().err


def test_bad_command_line_values_exit_2(checkpoint, vision_checkpoint, corpus, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    ask, vision = ["ask", "--checkpoint", checkpoint], ["ask", "--checkpoint", vision_checkpoint]
    train = ["train", "lm", "--config", DEMO_CONFIG, "--model=debug", f"--data.shards={corpus}",
             f"--data.tokenizer={corpus / 'tokenizer.model'}", "--data.num_workers=0", "--train.device=cpu",
             f"--train.out_dir={tmp_path / 'run'}"]
    rows = [
        ([*ask, "--temperature", "nan", "hi"], "temperature must be a finite number >= 0 (0 = greedy), got nan"),
        ([*ask, "--max-new-tokens", "2.5", "hi"], "argument --max-new-tokens: invalid int value: '2.5'"),
        ([*ask, "--top-p", "1.5", "hi"], "top_p must be a number in (0, 1], got 1.5"),
        ([*ask, "--device", "tpu", "hi"], "--device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"),
        ([*vision, "--image", "http://example.com/a.jpg", "hi"], "image http://example.com/a.jpg: URLs are not "),
        ([*vision, "--image", tmp_path / "no.png", "hi"], f"image file {tmp_path / 'no.png'} does not exist"),
        (["ask", "--checkpoint", tmp_path / "nope", "hi"], f"{tmp_path / 'nope'}: not a checkpoint directory"),
        ([*train, "--train.lr=nan"], "'train.lr' must be a finite number, got 'nan'"),
        ([*train, "--train.device=tpu"], "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"),
        ([*train, f"--train.out_dir={a_file / 'run'}"], f"cannot create train.out_dir {a_file / 'run'}: Not a "
                                                        "directory"),
        (["train", "nonsense"], "unknown training stage 'nonsense'"),
        (["data", "synth", "--kind", "text", "--out", tmp_path / "s", "--n", "0"], "n must be a positive number"),
        (["data", "synth", "--kind", "movie", "--out", tmp_path / "s", "--n", "3"], "invalid choice: 'movie'"),
    ]
    for argv, message in rows:
        code, err = run_cli(argv, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (argv, code, err)


def test_version_and_help_show_what_a_user_needs(capsys):
    import inspect
    from importlib.metadata import version

    from mm_llama import MMLlama, __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mm-llama {__version__}" == f"mm-llama {version('mm-llama')}"
    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 256)" in text and "(default: auto)" in text and "(default: None)" not in text
    for method in (MMLlama.ask, MMLlama.ask_stream, Assistant.ask):
        assert {"max_new_tokens", "temperature", "image", "images"} <= set(inspect.signature(method).parameters)
