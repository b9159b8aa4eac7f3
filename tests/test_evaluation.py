"""`mm-llama eval`: held-out, balanced, deterministic items; exact scoring; the table and JSON; the command."""

import json
import subprocess

import pytest

from conftest import run_mm_llama
from mm_llama.data.world import split_of_scene, split_of_sentence
from mm_llama.data.world_language import QUESTION_TYPES
from mm_llama.errors import InputError
from mm_llama.evaluation.runner import evaluate
from mm_llama.evaluation.tasks import SUITES, suite_tasks


def test_items_are_held_out_balanced_and_deterministic():
    for task in SUITES["shapes"]:
        items = task.items(6, seed=3)
        assert [i.qtype for i in items] == [t for t in QUESTION_TYPES for _ in range(6)]
        assert all(split_of_scene(i.scene) == "heldout" for i in items)
        # The question sentence is held out (text-qa: the caption, then the question, both held out).
        assert all(split_of_sentence(i.question if task.name == "image-qa" else i.question.rsplit(". ", 1)[-1])
                   == "heldout" for i in items), task.name
        assert [(i.question, i.answer) for i in items] == [(i.question, i.answer) for i in task.items(6, seed=3)]
        assert [i.question for i in items] != [i.question for i in task.items(6, seed=4)]
        assert all((i.image is not None) == (task.medium == "image") for i in items)


class OracleAssistant:
    """A test double of `Assistant` that knows the answers: right on the types in `right`, wrong elsewhere. It tests
    the scoring and the report, not a model (the shipped model's accuracy is tested in test_demo_model.py)."""

    class _Config:
        vision = object()

    class _Model:
        pass

    def __init__(self, answers: dict[str, str], right: set[str], types: dict[str, str], vision=True):
        self.answers, self.right, self.types = answers, right, types
        self.model = self._Model()
        self.model.config = self._Config()
        if not vision:
            self.model.config.vision = None
        self.tokenizer = None  # set by `oracle`
        self.asked = []

    def ask(self, question, image=None, max_new_tokens=256):
        self.asked.append((question, image is not None, max_new_tokens))
        answer = self.answers[question]
        return f" {answer}\n" if self.types[question] in self.right else answer + " Maybe."


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    from mm_llama.tokenizer import Tokenizer, write_ranks

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    write_ranks(path, {bytes([b]): b for b in range(256)})
    return Tokenizer.from_file(path)


def oracle(byte_tokenizer, right, vision=True):
    answers, types = {}, {}
    for task in SUITES["shapes"]:
        for item in task.items(4, seed=0):
            answers[item.question], types[item.question] = item.answer, item.qtype
    assistant = OracleAssistant(answers, right, types, vision)
    assistant.tokenizer = byte_tokenizer
    return assistant


def test_scoring_table_and_json_count_exact_answers(byte_tokenizer):
    assistant = oracle(byte_tokenizer, right={"colour", "count", "existence"})
    report = evaluate(assistant, "shapes", n_per_type=4, seed=0, progress=False, checkpoint="x")
    data = report.to_json()
    for task in ("text-qa", "image-qa"):
        types = data["tasks"][task]["types"]
        assert {t: v["correct"] for t, v in types.items()} == {
            t: 4 if t in ("colour", "count", "existence") else 0 for t in QUESTION_TYPES}
        assert data["tasks"][task]["n"] == 28 and data["tasks"][task]["correct"] == 12
        assert abs(data["tasks"][task]["accuracy"] - 12 / 28) < 1e-12
        assert len(data["wrong"][task]) == 5 and data["wrong"][task][0]["got"].endswith("Maybe.")
    table = report.table().splitlines()
    assert table[0].split() == ["task", "question", "type", "n", "correct", "accuracy"]
    assert "image-qa  colour" in table[-8] and table[-8].split()[-4:] == ["4", "4", "100.0", "%"]
    assert table[-1].split() == ["image-qa", "all", "28", "12", "42.9", "%"]
    assert len(table) == 2 + 2 * 8
    # Every question asked once, with room for its answer (byte-level: one token per byte) and no more than +16.
    assert len(assistant.asked) == 56 and sum(img for _, img, _ in assistant.asked) == 28
    longest = max(len(a.encode()) for a in assistant.answers.values())
    assert {m for _, _, m in assistant.asked} == {longest + 16}
    json.dumps(data)


def test_a_task_the_model_cannot_take_is_skipped_and_said(byte_tokenizer):
    report = evaluate(oracle(byte_tokenizer, right=set(QUESTION_TYPES), vision=False), n_per_type=4,
                      progress=False)
    assert report.skipped == {"image-qa": "the model takes no image"}
    assert report.to_json()["tasks"]["text-qa"]["accuracy"] == 1.0
    assert report.table().splitlines()[-1] == "image-qa: skipped (the model takes no image)"


def test_unknown_suite_or_task_names_the_known_ones():
    with pytest.raises(InputError, match="known suites: shapes"):
        suite_tasks("nope")
    with pytest.raises(InputError, match="its tasks: image-qa, text-qa"):
        suite_tasks("shapes", ["image-qa", "video-qa"])


def mm_llama(*args) -> subprocess.CompletedProcess:
    return run_mm_llama(*args, timeout=300)


def test_command_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "eval.json"
    result = mm_llama("eval", "--suite", "shapes", "--n-per-type", "1", "--task", "image-qa", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = [line.split("  ") for line in result.stdout.splitlines()[2:9]]
    assert [r[0].strip() for r in rows] == ["image-qa"] * 7
    data = json.loads(out.read_text())
    assert data["checkpoint"] == "demo" and set(data["tasks"]) == {"image-qa"}
    assert data["tasks"]["image-qa"]["n"] == 7
    bad = mm_llama("eval", "--suite", "shapes", "--task", "video-qa")
    assert bad.returncode == 2 and "its tasks: image-qa, text-qa" in bad.stderr and "Traceback" not in bad.stderr
