"""Strict YAML <-> dataclass configs: loading, errors, presets, command-line overrides, round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from mm_llama.config import from_dict, load_config, merge, parse_overrides, save_config, to_dict, to_yaml
from mm_llama.errors import ConfigError
from mm_llama.llama import LLAMA_PRESETS, LlamaConfig


@dataclass
class DataSection:
    shards: list[str]  # required: there is no sensible default data set
    batch_size: int = 4
    shuffle: bool = True
    tokenizer: str | None = None


@dataclass
class TrainSection:
    lr: float = 1e-4
    steps: int = 100
    optimizer: Literal["adamw", "sgd"] = "adamw"
    betas: tuple[float, ...] = (0.9, 0.95)
    lr_scale: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}")


@dataclass
class Stage:
    model: LlamaConfig
    data: DataSection
    train: TrainSection = field(default_factory=TrainSection)


TRAIN_KEYS = "['lr', 'steps', 'optimizer', 'betas', 'lr_scale']"
DATA = {"shards": ["a.tar"]}


def write(tmp_path, text: str, name: str = "stage.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def raises(data: dict, source: str = "stage.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(Stage, data, source=source)
    return str(info.value)


def test_yaml_file_loads_to_the_expected_object(tmp_path):
    path = write(tmp_path, """
model: debug
data:
  shards: [a/0.tar, a/1.tar]
  batch_size: 2
  tokenizer: null
train:
  lr: 3e-4        # PyYAML reads this as the string '3e-4'; the float field converts it
  optimizer: sgd
  betas: [0.9, 1]
  lr_scale: {encoder: 0.1}
""")
    cfg = load_config(Stage, path)
    assert cfg == Stage(model=LlamaConfig.preset("debug"),
                        data=DataSection(shards=["a/0.tar", "a/1.tar"], batch_size=2),
                        train=TrainSection(lr=0.0003, optimizer="sgd", betas=(0.9, 1.0), lr_scale={"encoder": 0.1}))
    assert type(cfg.train.lr) is float and type(cfg.train.betas[1]) is float and type(cfg.train.betas) is tuple


def test_unknown_keys_name_the_dotted_key_the_file_and_the_known_keys(tmp_path):
    path = write(tmp_path, "model: debug\ndata: {shards: [a.tar]}\ntrain: {lrr: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(Stage, path)
    assert str(info.value) == f"{path}: unknown key 'train.lrr'; known keys of section 'train': {TRAIN_KEYS}"

    path = write(tmp_path, "model: debug\ndata: {shards: [a.tar]}\ntrian: {lr: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(Stage, path)
    assert str(info.value) == f"{path}: unknown key 'trian'; known keys of the top level: ['model', 'data', 'train']"

    # Inside a preset section the known keys are LlamaConfig's fields plus `preset`.
    message = raises({"model": {"preset": "debug", "dimm": 128}, "data": DATA})
    assert message.startswith("stage.yaml: unknown key 'model.dimm'; known keys of section 'model': ['dim', ")
    assert message.endswith(", 'tie_embeddings', 'preset']")


@pytest.mark.parametrize("section, values, message", [
    ("train", {"steps": "ten"}, "'train.steps' must be int, got 'ten' (str)"),
    ("train", {"steps": 10.0}, "'train.steps' must be int, got 10.0 (float)"),
    ("train", {"lr": True}, "'train.lr' must be float, got True (bool)"),
    ("train", {"lr": None}, "'train.lr' must be float, got None (NoneType)"),
    ("data", {"shards": DATA["shards"], "shuffle": 1}, "'data.shuffle' must be bool, got 1 (int)"),
    ("data", {"shards": DATA["shards"], "shuffle": "true"}, "'data.shuffle' must be bool, got 'true' (str)"),
    ("train", {"optimizer": "adam"}, "'train.optimizer' must be one of 'adamw', 'sgd', got 'adam' (str)"),
    ("data", {"shards": "a.tar"}, "'data.shards' must be list[str], got 'a.tar' (str)"),
    ("data", {"shards": ["a.tar", 3]}, "'data.shards[1]' must be str, got 3 (int)"),
    ("data", {"shards": DATA["shards"], "tokenizer": 5}, "'data.tokenizer' must be str, got 5 (int)"),
    ("train", {"betas": 0.9}, "'train.betas' must be tuple[float, ...], got 0.9 (float)"),
    ("train", {"lr_scale": {"encoder": "x"}}, "'train.lr_scale.encoder' must be float, got 'x' (str)"),
    ("train", [1, 2], "'train' must be a TrainSection mapping, got [1, 2] (list)"),
])
def test_wrong_types_name_the_key_the_expected_type_and_the_value(section, values, message):
    data = {"model": "debug", "data": DATA, section: values}
    assert raises(data) == f"stage.yaml: {message}"


def test_missing_required_fields_are_named():
    assert raises({"model": "debug", "data": {"batch_size": 2}}) == (
        "stage.yaml: missing required key(s) 'data.shards' (DataSection has no default for them)")
    assert raises({"model": "debug"}) == "stage.yaml: missing required key(s) 'data' (Stage has no default for them)"


def test_component_validation_runs_and_is_located():
    assert raises({"model": "debug", "data": DATA, "train": {"steps": 0}}) == (
        "stage.yaml: 'train': steps must be positive, got 0")
    assert raises({"model": {"preset": "debug", "dim": 66}, "data": DATA}) == (
        "stage.yaml: 'model': invalid LlamaConfig: dim 66 is not divisible by n_heads 4")


def test_preset_string_and_preset_mapping():
    debug = LLAMA_PRESETS["debug"]
    cfg = from_dict(Stage, {"model": "debug", "data": DATA}, source="s")
    assert (cfg.model.dim, cfg.model.n_layers) == (debug["dim"], debug["n_layers"]) == (64, 2)
    assert cfg.model == LlamaConfig.preset("debug")

    cfg = from_dict(Stage, {"model": {"preset": "debug", "n_layers": 3, "norm_eps": 1}, "data": DATA}, source="s")
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads) == (debug["dim"], 3, debug["n_heads"])
    assert type(cfg.model.norm_eps) is float
    assert cfg.model == LlamaConfig.preset("debug", n_layers=3, norm_eps=1.0)

    assert raises({"model": {"preset": "debug", "dim": "big"}, "data": DATA}) == (
        "stage.yaml: 'model.dim' must be int, got 'big' (str)")
    assert raises({"model": "tiny", "data": DATA}) == (
        f"stage.yaml: 'model': unknown Llama preset 'tiny'; known presets: {sorted(LLAMA_PRESETS)}")
    assert raises({"model": 5, "data": DATA}) == (
        "stage.yaml: 'model' must be a LlamaConfig mapping or preset name, got 5 (int)")


def test_int_is_accepted_for_a_float_and_numeric_strings_for_numbers():
    cfg = from_dict(Stage, {"model": "debug", "data": DATA, "train": {"lr": 1, "steps": "50"}}, source="s")
    assert (cfg.train.lr, cfg.train.steps) == (1.0, 50)
    assert type(cfg.train.lr) is float and type(cfg.train.steps) is int


def test_parse_overrides_builds_a_nested_dict():
    args = ["--train.lr=3e-4", "--data.shards", "a/{0..3}.tar", "--model.preset=debug", "--a.b=true", "--a.c", "12",
            "--a.d=[1, 2]", "--a.e=null"]
    assert parse_overrides(args) == {"train": {"lr": "3e-4"}, "data": {"shards": "a/{0..3}.tar"},
                                     "model": {"preset": "debug"}, "a": {"b": True, "c": 12, "d": [1, 2], "e": None}}


@pytest.mark.parametrize("args, message", [
    (["--x.y"], "command line: '--x.y' has no value; write --x.y=VALUE or --x.y VALUE"),
    (["--x.y", "--z=1"], "command line: '--x.y' has no value; write --x.y=VALUE or --x.y VALUE"),
    (["--x.y="], "command line: '--x.y=' has no value; write --x.y=VALUE or --x.y VALUE"),
    (["x.y=1"], "command line: expected --section.key=value or --section.key value, got 'x.y=1'"),
    (["--x..y=1"], "command line: '--x..y=1' has a malformed key; expected --section.key=value"),
])
def test_bad_override_arguments_are_shown(args, message):
    with pytest.raises(ConfigError) as info:
        parse_overrides(args)
    assert str(info.value) == message


def test_overrides_apply_over_the_file(tmp_path):
    path = write(tmp_path, "model: debug\ndata:\n  shards: [a.tar]\ntrain:\n  steps: 10\n")
    cfg = load_config(Stage, path, ["--train.lr=3e-4", "--train.steps", "50", "--model.dim=128",
                                    "--data.shards=[x.tar, y.tar]", "--data.tokenizer", "tok.model"])
    assert cfg.train.lr == 0.0003 and type(cfg.train.lr) is float
    assert cfg.train.steps == 50
    assert cfg.model == LlamaConfig.preset("debug", dim=128)
    assert cfg.data == DataSection(shards=["x.tar", "y.tar"], tokenizer="tok.model")

    with pytest.raises(ConfigError) as info:
        load_config(Stage, path, ["--train.lrr=1"])
    assert str(info.value) == (
        f"{path} + command line: unknown key 'train.lrr'; known keys of section 'train': {TRAIN_KEYS}")

    cfg = load_config(Stage, None, ["--model=debug", "--model.n_layers=1", "--data.shards=[a.tar]"])
    assert cfg.model == LlamaConfig.preset("debug", n_layers=1)
    with pytest.raises(ConfigError) as info:
        load_config(Stage, None, ["--model=debug"])
    assert str(info.value) == "command line: missing required key(s) 'data' (Stage has no default for them)"


def test_merge_is_deep_turns_a_preset_string_into_a_mapping_and_copies():
    base = {"model": "debug", "train": {"lr": 1, "steps": 2}, "data": {"shards": ["a"]}}
    merged = merge(base, {"model": {"dim": 128}, "train": {"steps": 5}, "data": {"shards": ["b"]}})
    assert merged == {"model": {"preset": "debug", "dim": 128}, "train": {"lr": 1, "steps": 5},
                      "data": {"shards": ["b"]}}
    assert base == {"model": "debug", "train": {"lr": 1, "steps": 2}, "data": {"shards": ["a"]}}
    assert merge({"model": {"preset": "debug", "dim": 128}}, {"model": "8B"}) == {"model": "8B"}


def test_to_yaml_round_trip_and_field_order(tmp_path):
    cfg = Stage(model=LlamaConfig.preset("debug", dim=128), data=DataSection(shards=["a.tar", "b.tar"]),
                train=TrainSection(lr=3e-4, betas=(0.8, 0.99), lr_scale={"encoder": 0.1}))
    plain = to_dict(cfg)
    assert list(plain) == ["model", "data", "train"]
    assert plain["train"] == {"lr": 3e-4, "steps": 100, "optimizer": "adamw", "betas": [0.8, 0.99],
                              "lr_scale": {"encoder": 0.1}}
    assert from_dict(Stage, plain) == cfg

    text = to_yaml(cfg)
    assert text.startswith("model:\n  dim: 128\n  n_layers: 2\n  n_heads: 4\n  n_kv_heads: 2\n")
    assert "data:\n  shards: [a.tar, b.tar]\n  batch_size: 4\n  shuffle: true\n  tokenizer: null\ntrain:\n" in text
    assert from_dict(Stage, yaml.safe_load(text), source="text") == cfg

    save_config(cfg, tmp_path / "runs" / "resolved.yaml")
    assert (tmp_path / "runs" / "resolved.yaml").read_text() == text
    assert load_config(Stage, tmp_path / "runs" / "resolved.yaml") == cfg


def test_bad_files_are_named(tmp_path):
    path = write(tmp_path, "model: debug\ntrain:\n  lr: [1, 2\n  steps: 3\n", name="broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(Stage, path)
    assert str(info.value).startswith(f"{path}: not valid YAML at line 4, column 8: ")
    assert str(info.value).endswith("(while parsing a flow sequence at line 3)")

    path = write(tmp_path, "model: debug\nmodel: 8B\n", name="twice.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(Stage, path)
    assert str(info.value) == f"{path}: not valid YAML at line 2, column 1: duplicate key 'model'"

    path = write(tmp_path, "- model\n- data\n", name="list.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(Stage, path)
    assert str(info.value) == f"{path}: the top level must be a mapping of sections, got list"

    with pytest.raises(ConfigError) as info:
        load_config(Stage, tmp_path / "missing.yaml")
    assert str(info.value) == f"{tmp_path / 'missing.yaml'}: config file not found"
