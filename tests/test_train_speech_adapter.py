"""Stage `speech-adapter` (paper §8.3.2) on the demo model and shapes-world speech from espeak-ng: the chats
(system prompts, spans, labels on the target only), the loss falls while the base model stays bit-identical, resume
equals an uninterrupted run, the encoder starts from a speech-pretrain checkpoint, and bad settings are refused."""

from pathlib import Path

import pytest
import torch

from conftest import Crash, crash_after
from mm_llama.checkpoints.composed import read_ours_composed
from mm_llama.config import load_config
from mm_llama.data.chat import IGNORE
from mm_llama.data.speech_chat import SpeechChatBatches, SpeechChatDataConfig
from mm_llama.errors import CheckpointError, ConfigError
from mm_llama.model import MMLlama
from mm_llama.tokenizer import Tokenizer
from mm_llama.train.loop import train
from mm_llama.train.speech_adapter import SpeechAdapterStage, SpeechAdapterStageConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "speech_adapter.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from mm_llama.data.synth_speech import synth_speech

    out = tmp_path_factory.mktemp("speech")
    synth_speech(out, 24, seed=5, workers=1)
    return out


@pytest.fixture(scope="module")
def base() -> Path:
    """The embedded demo model: a trunk that knows the shapes world's language, so the targets are learnable in a
    few steps (through a random trunk, 24 steps move nothing)."""
    from mm_llama.paths import checkpoint_path

    return checkpoint_path("demo")


def stage_config(shards: Path, base: Path, run: Path, *extra: str, **train) -> SpeechAdapterStageConfig:
    overrides = [f"--base_model={base}", "--pretrained_encoder=null", "--encoder=debug", "--adapter.in_dim=64",
                 "--adapter.dim=64", "--adapter.n_heads=4", "--adapter.ffn_dim=128", f"--data.shards={shards}",
                 f"--data.tokenizer={shards / 'tokenizer.model'}", "--data.batch_size=4", "--data.num_workers=0",
                 "--data.shuffle_buffer=8", f"--train.out_dir={run}", "--train.lr=3e-3", "--train.warmup_steps=2",
                 "--train.log_every=1", "--train.weight_decay=0.0", *extra,
                 *(f"--train.{k}={v}" for k, v in train.items())]
    return load_config(SpeechAdapterStageConfig, CONFIG, overrides)


def test_chats_hold_each_utterance_in_its_span_with_labels_on_the_target(shards, base):
    config = stage_config(shards, base, Path("unused"))
    tok = Tokenizer.from_file(shards / "tokenizer.model")
    data = SpeechChatBatches(SpeechChatDataConfig(shards=str(shards), tokenizer=str(shards / "tokenizer.model"),
                                                  tile_size=84, max_tiles=1, batch_size=8, shuffle_buffer=0,
                                                  resampled=False), config.adapter, stack=4)
    batch = next(data.batches())
    speech, tokens, labels = batch["speech"], batch["tokens"], batch["labels"]
    assert len(speech) == 8 and batch["images"] is not None
    from adapters.speech import speech_positions

    need = speech_positions(speech.lengths, 4, config.adapter).tolist()
    n_images = 0
    for row, row_labels, n, has_image in zip(tokens.tolist(), labels.tolist(), need, batch["images"].n_images,
                                             strict=True):
        start = row.index(tok.speech_start_id)
        assert row[start + 1 : start + 1 + n] == [tok.speech_id] * n and row[start + 1 + n] == tok.speech_end_id
        target = [t for t, label in zip(row, row_labels, strict=True) if label != IGNORE]
        text = tok.decode(target[:-1])
        assert target[-1] == tok.eot_id and text.strip() and all(label == IGNORE for label in row_labels[:start + n])
        prompt = tok.decode(row[:start])
        if has_image:  # a spoken question about a picture: no system prompt, the picture first
            n_images += 1
            assert "system" not in prompt and row[start - 1] == tok.image_id
            assert text.endswith(".")  # an answer
        else:  # recognition: the paper's prompt, then the transcript
            assert "Repeat after me in English:" in prompt and tok.image_id not in row
    assert 0 < n_images < 8


def test_loss_falls_the_base_stays_and_resume_equals_uninterrupted(shards, base, tmp_path):
    # With SpecAugment: its masks are drawn from the data position, so a resumed run masks as the uninterrupted one.
    augment = "--spec_augment.time_masks=2"
    config = stage_config(shards, base, tmp_path / "run", augment, steps=24, checkpoint_every=12)
    assert config.spec_augment.time_masks == 2
    result = train(SpeechAdapterStage(config), config.train)
    losses = [result.losses[k] for k in sorted(result.losses)]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    # The base model's trunk and parts are bit-identical in the checkpoint (and in the trained model), but for the
    # embedded model's own speech parts: the stage's new ones (debug sizes) replace them.
    base_config, base_state = read_ours_composed(base)
    config_after, state_after = read_ours_composed(result.last_checkpoint)
    assert config_after.vision == base_config.vision and config_after.video_adapter == base_config.video_adapter
    assert (base_config.speech_encoder.dim, config_after.speech_encoder.dim, config_after.speech_adapter.dim) == (
        192, 64, 64)
    speech = ("speech_encoder.", "speech_adapter.")
    assert {k for k in state_after if not k.startswith(speech)} == {k for k in base_state if not k.startswith(speech)}
    for k, v in base_state.items():
        if k.startswith(speech):
            continue
        assert torch.equal(state_after[k], v), k
        assert torch.equal(result.model.state_dict()[k].to(v.dtype), v), k
    loaded = MMLlama.from_pretrained(result.last_checkpoint, dtype=torch.float32).state_dict()
    trained = {k: v for k, v in result.model.state_dict().items()
               if k.startswith(("speech_encoder.", "speech_adapter."))}
    assert trained and all(torch.equal(loaded[k], v) for k, v in trained.items())  # the checkpoint holds what trained
    # A run that dies after step 14 resumes from its step-12 checkpoint and gives the uninterrupted run's losses.
    crashed = crash_after(SpeechAdapterStage(stage_config(shards, base, tmp_path / "part", augment, steps=24,
                                                          checkpoint_every=12)), n_batches=14)
    with pytest.raises(Crash):
        train(crashed, crashed.config.train)
    again = stage_config(shards, base, tmp_path / "part", augment, steps=24, checkpoint_every=12)
    resumed = train(SpeechAdapterStage(again), again.train, resume=True)
    assert sorted(resumed.losses) == list(range(13, 25))
    for step in range(13, 25):
        assert abs(resumed.losses[step] - result.losses[step]) <= 1e-5, step


def test_the_encoder_starts_from_a_speech_pretrain_checkpoint(shards, base, tmp_path):
    from mm_llama.train.speech_pretrain import SpeechPretrainStage, SpeechPretrainStageConfig

    pre = load_config(SpeechPretrainStageConfig, Path(__file__).resolve().parents[1] / "configs" / "demo" /
                      "speech_pretrain.yaml",
                      ["--encoder=debug", "--best_rq.codebook_size=64", "--best_rq.n_codebooks=2",
                       f"--data.shards={shards}", "--data.batch_size=4", "--data.num_workers=0",
                       "--data.shuffle_buffer=4", f"--train.out_dir={tmp_path / 'pre'}", "--train.steps=2",
                       "--train.log_every=1"])
    pretrained = train(SpeechPretrainStage(pre), pre.train).last_checkpoint
    config = stage_config(shards, base, tmp_path / "run", f"--pretrained_encoder={pretrained}", "--encoder=null")
    stage = SpeechAdapterStage(config)
    from mm_llama.train.distributed import Runtime

    model = stage.build(Runtime(rank=0, world_size=1, device=torch.device("cpu"), distributed=False))
    from mm_llama.checkpoints.ours import read_ours_parts

    encoder = read_ours_parts(pretrained)["speech_encoder"][1]
    assert encoder and all(torch.equal(model.state_dict()[k], v) for k, v in encoder.items())
    assert all(p.requires_grad for p in model.speech_encoder.parameters())
    assert not any(p.requires_grad for p in model.trunk.parameters()) and not any(
        p.requires_grad for p in model.media.parameters())  # the base's media rows stay


def test_bad_settings_are_refused(shards, base, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of pretrained_encoder"):
        stage_config(shards, base, tmp_path, "--encoder=null")
    with pytest.raises(ConfigError, match="data.max_seconds .* is over adapter.max_seconds"):
        stage_config(shards, base, tmp_path, "--adapter.max_seconds=10", "--data.max_seconds=20")
    from mm_llama.train.distributed import Runtime

    runtime = Runtime(rank=0, world_size=1, device=torch.device("cpu"), distributed=False)
    with pytest.raises(ConfigError, match=r"adapter.in_dim \(32\) must equal the speech encoder's dim \(64\)"):
        SpeechAdapterStage(stage_config(shards, base, tmp_path, "--adapter.in_dim=32")).build(runtime)
    # A model that does not hear: the error lists the parts it has (init_from reads only the speech parts' weights).
    from mm_llama.checkpoints.ours import write_ours
    from mm_llama.train.speech_adapter import pretrained_encoder

    deaf = tmp_path / "deaf"
    deaf.mkdir()
    write_ours(deaf, trunk={}, parts={"vision_projection": (None, {"vision_projection.weight": torch.zeros(2, 2)})})
    with pytest.raises(CheckpointError, match=r"^init_from .*deaf: no speech encoder in it \(parts "
                                              r"\['vision_projection'\]\); give a model that hears"):
        SpeechAdapterStage(stage_config(shards, base, tmp_path, "--encoder=null", f"--init_from={deaf}")).build(runtime)
    with pytest.raises(CheckpointError, match=r"deaf: no speech encoder in it \(parts \['vision_projection'\]\); "
                                              r"give a speech-pretrain checkpoint"):
        pretrained_encoder(deaf)
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    with pytest.raises(CheckpointError, match=r"^base_model .*not-a-model: .*\(the speech stage builds on an mm-llama "
                                              r"checkpoint: a stage lm, image-adapter or video-adapter checkpoint"):
        SpeechAdapterStage(stage_config(shards, not_a_model, tmp_path / "run")).build(runtime)


def test_samples_the_stage_cannot_use_are_skipped_with_their_reason(shards):
    import json

    from adapters.speech import SpeechAdapterConfig
    from mm_llama.data.pipeline import BadSample
    from mm_llama.data.speech_chat import _Decode, speech_chat

    assert speech_chat({"task": "asr", "language": "English"}, "It is red.", "k") == (
        "asr", "Repeat after me in English:", "It is red.")
    assert speech_chat({"task": "ast", "language": "French", "target": "Il est rouge."}, "It is red.", "k") == (
        "ast", "Translate the following sentence into French:", "Il est rouge.")
    assert speech_chat({"task": "dialogue", "answer": "It is red."}, None, "k") == ("dialogue", None, "It is red.")
    for record, text, reason in (({"task": "speak"}, "x", "json 'task' must be one of"),
                                 ({"task": "asr", "language": "English"}, None, "needs a 'txt' transcript"),
                                 ({"task": "ast", "language": "French"}, "x", "needs json 'target'"),
                                 ({"task": "asr"}, "x", "needs json 'language'"),
                                 ([], "x", "got 'list'")):
        with pytest.raises(BadSample, match=reason):
            speech_chat(record, text, "k")
    import tarfile

    with tarfile.open(sorted(shards.glob("*.tar"))[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    key = sorted(name.split(".")[0] for name in members)[0]
    sample = {"__key__": key, **{name.split(".", 1)[1]: data for name, data in members.items()
                                 if name.startswith(key + ".")}}
    tok = Tokenizer.from_file(shards / "tokenizer.model")
    decode = _Decode(tok, SpeechAdapterConfig(in_dim=64, dim=64, n_heads=4), 4, max_seconds=60, seq_len=256)
    chat = decode(sample)
    assert len(chat.tokens) == len(chat.labels) and chat.n_samples > 16_000 * 0.5
    for changed, reason in (({"flac": b"not audio"}, "does not decode"), ({"json": b"{"}, "not UTF-8 text/JSON"),
                            ({"flac": None}, "needs an audio member")):
        bad = {k: v for k, v in {**sample, **changed}.items() if v is not None}
        with pytest.raises(BadSample, match=reason):
            decode(bad)
    with pytest.raises(BadSample, match="over data.max_seconds"):
        _Decode(tok, SpeechAdapterConfig(in_dim=64, dim=64, n_heads=4), 4, max_seconds=0.5, seq_len=256)(sample)
    with pytest.raises(BadSample, match=r"its chat is \d+ tokens, over data.seq_len \(20\)"):
        _Decode(tok, SpeechAdapterConfig(in_dim=64, dim=64, n_heads=4), 4, max_seconds=60, seq_len=20)(sample)
    assert json.loads(sample["json"])["task"] in ("asr", "dialogue")


def test_init_from_continues_a_models_own_speech_parts(shards, base, tmp_path):
    # The embedded model's encoder and adapter are the start: they already hear the shapes world, so the first loss is
    # a fraction of a fresh start's; the checkpoint holds the continued parts with the base's others unchanged.
    demo_sizes = ("--adapter.in_dim=192", "--adapter.dim=256", "--adapter.n_heads=4", "--adapter.ffn_dim=512")
    config = stage_config(shards, base, tmp_path / "run", "--encoder=null", "--init_from=demo", *demo_sizes,
                          "--train.lr=1e-4", steps=2, checkpoint_every=2)
    stage = SpeechAdapterStage(config)
    from mm_llama.checkpoints.ours import read_ours_parts
    from mm_llama.train.distributed import Runtime

    model = stage.build(Runtime(rank=0, world_size=1, device=torch.device("cpu"), distributed=False))
    demo = read_ours_parts(base)
    assert set(read_ours_parts(base, ["speech_encoder", "speech_adapter"])) == {"speech_encoder", "speech_adapter"}
    assert {"vision", "speech_encoder", "speech_adapter"} <= set(demo)  # init_from reads only the two it continues
    for part in ("speech_encoder", "speech_adapter"):
        assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in demo[part][1].items()), part
    continued = train(SpeechAdapterStage(config), config.train)
    fresh_config = stage_config(shards, base, tmp_path / "fresh", steps=2, checkpoint_every=2)
    fresh = train(SpeechAdapterStage(fresh_config), fresh_config.train)
    assert continued.losses[1] < 0.25 * fresh.losses[1], (continued.losses, fresh.losses)
    after = read_ours_parts(continued.last_checkpoint)
    assert after["speech_adapter"][0] == demo["speech_adapter"][0]
    assert any(not torch.equal(after["speech_encoder"][1][k].float(), v.float())
               for k, v in demo["speech_encoder"][1].items())  # it trained
    _, base_state = read_ours_composed(base)
    _, state_after = read_ours_composed(continued.last_checkpoint)
    assert all(torch.equal(state_after[k], v) for k, v in base_state.items()
               if not k.startswith(("speech_encoder.", "speech_adapter.")))


def test_init_from_is_refused_with_another_start_or_other_adapter_sizes(shards, base, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of pretrained_encoder .* and init_from"):
        stage_config(shards, base, tmp_path, "--init_from=demo")  # the test config's fresh encoder as well
    from mm_llama.train.distributed import Runtime

    runtime = Runtime(rank=0, world_size=1, device=torch.device("cpu"), distributed=False)
    with pytest.raises(ConfigError, match=r"^init_from demo: its speech adapter is .*dim=256.* the adapter section "
                                          r".*dim=64.*; make the section the model's"):
        SpeechAdapterStage(stage_config(shards, base, tmp_path, "--encoder=null", "--init_from=demo")).build(runtime)
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    with pytest.raises(CheckpointError, match=r"^init_from .*not-a-model: .*\(a model that hears"):
        SpeechAdapterStage(stage_config(shards, base, tmp_path, "--encoder=null", f"--init_from={not_a_model}")
                           ).build(runtime)


def test_the_continue_config_is_the_shipped_models_recipe():
    # What continued the embedded model's speech parts (README): the demo's adapter sizes, SpecAugment, 300 steps.
    config = load_config(SpeechAdapterStageConfig, CONFIG.with_name("speech_adapter_continue.yaml"))
    assert (config.init_from, config.base_model, config.pretrained_encoder, config.encoder) == (
        "runs/speech/model", "runs/speech/model", None, None)
    assert config.adapter == load_config(SpeechAdapterStageConfig, CONFIG).adapter
    assert config.spec_augment.time_masks == 4 and config.spec_augment.freq_masks == 2
    assert (config.train.steps, config.train.lr, config.data.batch_size) == (300, 3e-4, 16)
