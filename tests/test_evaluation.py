"""`mm-llama eval`: held-out, balanced, deterministic items; exact scoring; the table and JSON; the command."""

import json
import re
import subprocess
from types import SimpleNamespace

import pytest

from conftest import run_mm_llama
from mm_llama.cli import main
from mm_llama.data.world import split_of_scene, split_of_sentence
from mm_llama.data.world_language import QUESTION_TYPES, captions, questions
from mm_llama.data.world_time import TIME_QUESTION_TYPES
from mm_llama.errors import InputError
from mm_llama.evaluation.runner import evaluate
from mm_llama.evaluation.tasks import SUITES, suite_tasks


def test_items_are_held_out_balanced_and_deterministic():
    for task in SUITES["shapes"][:2]:  # text-qa, image-qa
        items = task.items(6, seed=3)
        assert [i.qtype for i in items] == [t for t in QUESTION_TYPES for _ in range(6)]
        assert all(split_of_scene(i.scene) == "heldout" for i in items)
        for i in items:
            # text-qa: "<caption> <question>"; the caption is a caption of the scene, and both sentences are held out.
            context, question = i.question.rsplit(". ", 1) if task.name == "text-qa" else ("", i.question)
            if context:
                assert context + "." in captions(i.scene) and split_of_sentence(context + ".") == "heldout", i
            assert split_of_sentence(question) == "heldout", i
            # The expected answer is the world's answer to that question about that scene.
            assert (question, i.answer) in {(q.question, q.answer) for q in questions(i.scene, i.qtype)}, i
        assert [(i.question, i.answer) for i in items] == [(i.question, i.answer) for i in task.items(6, seed=3)]
        assert [i.question for i in items] != [i.question for i in task.items(6, seed=4)]
        assert all((i.image is not None) == (task.medium == "image") for i in items)


def test_video_items_are_held_out_clips_and_time_questions():
    from encoders.video import read_video
    from mm_llama.data.world_clips import clip_questions
    from mm_llama.data.world_language import QA
    from mm_llama.data.world_time import TIME_QUESTION_TYPES, order_blind_accuracy

    (task,) = suite_tasks("shapes", ["video-qa"])
    items = task.items(2, seed=3)
    assert [i.qtype for i in items] == [t for t in TIME_QUESTION_TYPES for _ in range(2)]
    for i in items:
        assert split_of_scene(i.scene) == "heldout" and i.scene == i.clip.start
        assert split_of_sentence(i.question) == "heldout", i
        assert (i.question, i.answer) in {(q.question, q.answer) for q in clip_questions(i.clip, i.qtype)}, i
        # Every question needs time: a model blind to the order of frames gets it wrong some of the time.
        assert i.chance == order_blind_accuracy(i.clip, QA(i.question, i.answer, i.qtype)) < 1, i
        assert i.media() == {"video": i.video} and read_video(i.video, n_frames=16, tile_size=84,
                                                              max_tiles=1).frames.shape == (16, 84, 84, 3)
    assert [(i.question, i.answer) for i in items] == [(i.question, i.answer) for i in task.items(2, seed=3)]
    # The shuffled variant: the same clips and questions, the sampler's 16 frames in another order.
    (shuffled_task,) = suite_tasks("shapes", ["video-qa-shuffled"])
    shuffled = shuffled_task.items(2, seed=3)
    assert [(i.question, i.answer, i.clip) for i in shuffled] == [(i.question, i.answer, i.clip) for i in items]
    for plain, mixed in zip(items, shuffled, strict=True):
        a, b = (read_video(i.video, n_frames=16, tile_size=84, max_tiles=1).frames.astype(int) for i in (plain, mixed))
        # Each shuffled frame is one of the plain ones (up to compression), and the sequence differs.
        def changed(x, y):  # the fraction of pixels that differ by more than compression does
            return (abs(x - y).max(axis=-1) > 40).mean(axis=(-2, -1))

        assert max(changed(a, frame).min() for frame in b) < 0.002
        assert changed(a, b).max() > 0.005  # a small shape is ~1 % of the frame


class OracleAssistant:
    """A test double of `Assistant` that knows the answers: right on the types in `right`, wrong elsewhere. It tests
    the scoring and the report, not a model (the shipped model's accuracy is tested in test_demo_model.py)."""

    def __init__(self, answers: dict[str, str], right: set[str], types: dict[str, str], tokenizer, vision=True):
        self.answers, self.right, self.types, self.tokenizer = answers, right, types, tokenizer
        self.model = SimpleNamespace(config=SimpleNamespace(vision=object() if vision else None, video_adapter=None,
                                                            speech_adapter=None))
        self.asked, self.batches = [], []

    def ask_batch(self, questions, images=None, system=None, max_new_tokens=256):
        assert system is None
        images = images or [None] * len(questions)
        assert len(images) == len(questions)
        self.batches.append(len(questions))
        return [self.ask(q, image, max_new_tokens) for q, image in zip(questions, images, strict=True)]

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
    for task in SUITES["shapes"][:2]:  # text-qa, image-qa: the double takes no video
        for item in task.items(4, seed=0):
            answers[item.question], types[item.question] = item.answer, item.qtype
    return OracleAssistant(answers, right, types, byte_tokenizer, vision)


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
    assert data["overall"] == {"n": 56, "correct": 24, "accuracy": 24 / 56}
    table = report.table().splitlines()
    assert table[0].split() == ["task", "question", "type", "n", "correct", "accuracy"]
    assert "image-qa  colour" in table[-12] and table[-12].split()[-4:] == ["4", "4", "100.0", "%"]
    assert table[-5].split() == ["image-qa", "all", "28", "12", "42.9", "%"]
    assert table[-4:] == ["video-qa: skipped (the model takes no video)",
                          "video-qa-shuffled: skipped (the model takes no video)",
                          "asr: skipped (the model takes no speech)",
                          "spoken-qa: skipped (the model takes no speech and image)"]
    assert len(table) == 2 + 2 * 8 + 4
    # Every question asked once, with room for its answer (byte-level: one token per byte) and no more than +16.
    assert len(assistant.asked) == 56 and sum(img for _, img, _ in assistant.asked) == 28
    assert assistant.batches == [32, 24]  # batches of 32 (the default), across the two tasks
    longest = max(len(a.encode()) for a in assistant.answers.values())
    assert {m for _, _, m in assistant.asked} == {longest + 16}
    json.dumps(data)


def test_a_task_the_model_cannot_take_is_skipped_and_said(byte_tokenizer):
    report = evaluate(oracle(byte_tokenizer, right=set(QUESTION_TYPES), vision=False), n_per_type=4,
                      progress=False)
    assert report.skipped == {"image-qa": "the model takes no image", "video-qa": "the model takes no video",
                              "video-qa-shuffled": "the model takes no video", "asr": "the model takes no speech",
                              "spoken-qa": "the model takes no speech and image"}
    assert report.to_json()["tasks"]["text-qa"]["accuracy"] == 1.0
    assert report.table().splitlines()[-5:-3] == ["image-qa: skipped (the model takes no image)",
                                                  "video-qa: skipped (the model takes no video)"]


def test_speech_items_are_held_out_sentences_in_the_held_out_voice():
    from mm_llama.data.synth_speech import HELDOUT_VOICE, _speak
    from mm_llama.evaluation.tasks import ASR_PROMPT

    asr, spoken = suite_tasks("shapes", ["asr", "spoken-qa"])
    items = asr.items(2, seed=1)
    assert [i.qtype for i in items] == ["question", "question", "caption", "caption"]
    for i in items:
        assert split_of_sentence(i.question) == "heldout" and i.answer == i.question and i.text is None
        assert i.system == ASR_PROMPT and i.metric == "wer" and set(i.media()) == {"audio"}
        wave, rate = i.audio
        assert rate == 16_000 and (wave == _speak(i.question, HELDOUT_VOICE).numpy()).all()  # the held-out voice
    assert [i.question for i in asr.items(2, seed=1)] == [i.question for i in items]
    asked = spoken.items(1, seed=2)
    assert [i.qtype for i in asked] == list(QUESTION_TYPES)
    for i in asked:
        assert split_of_sentence(i.question) == "heldout" and i.system is None and i.metric == "exact"
        assert set(i.media()) == {"image", "audio"} and i.image.size == (84, 84) and i.text is None


class Transcriber(OracleAssistant):
    """Hears each asr item's sentence, says it with the first word dropped on questions (1 deletion each)."""

    def __init__(self, tokenizer):
        super().__init__({}, set(), {}, tokenizer, vision=False)
        self.model.config.speech_adapter = object()
        self.said = {}

    def ask_batch(self, questions, audios=None, system=None, max_new_tokens=256):
        assert questions == [None] * len(questions) and system == "Repeat after me in English:"
        self.batches.append(len(questions))
        return [self.said[id(wave)] for wave, _ in audios]


def test_asr_is_graded_in_word_errors(byte_tokenizer, monkeypatch):
    from mm_llama.evaluation import tasks
    from mm_llama.evaluation.wer import word_errors

    assert word_errors("Where is the red circle?", "where is a red circle") == (1, 5)
    assert word_errors("It is red.", "") == (3, 3) and word_errors("It is red.", "it is red it") == (1, 3)
    assistant = Transcriber(byte_tokenizer)
    (asr,) = suite_tasks("shapes", ["asr"])
    items = asr.items(3, seed=0)
    words = 0
    for i in items:
        words += len(i.answer.split()) if i.qtype == "question" else 0
        assistant.said[id(i.audio[0])] = i.answer.split(" ", 1)[1] if i.qtype == "question" else i.answer.upper()
    monkeypatch.setattr(tasks.Task, "items", lambda self, n, seed=0: items)
    report = evaluate(assistant, tasks=["asr"], n_per_type=3, progress=False)
    data = report.to_json()["tasks"]["asr"]
    assert data["types"]["question"]["wer"] == 3 / words and data["types"]["caption"]["wer"] == 0.0
    assert data["types"]["question"]["correct"] == 0 and data["types"]["caption"]["correct"] == 0  # case counts
    assert report.table().splitlines()[0].split()[-1] == "WER"


def test_unknown_suite_or_task_names_the_known_ones():
    with pytest.raises(InputError, match="known suites: shapes"):
        suite_tasks("nope")
    with pytest.raises(InputError, match="its tasks: asr, image-qa, spoken-qa, text-qa, video-qa, video-qa-shuffled"):
        suite_tasks("shapes", ["image-qa", "speech-qa"])


def mm_llama(*args) -> subprocess.CompletedProcess:
    return run_mm_llama(*args, timeout=300)


def test_command_prints_the_table_and_writes_json(tmp_path):
    """The embedded demo model (the default checkpoint), one question per type: every row, and the same numbers in
    the table and the JSON (the level is test_demo_model.py's business)."""
    out = tmp_path / "eval.json"
    result = mm_llama("eval", "--suite", "shapes", "--n-per-type", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["checkpoint"] == "demo" and (data["suite"], data["seed"], data["n_per_type"]) == ("shapes", 0, 1)
    lines = result.stdout.splitlines()
    assert lines[-1] == f"wrote {out}"
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[2:-1]]
    expected = []
    for task, types_asked in (("text-qa", QUESTION_TYPES), ("image-qa", QUESTION_TYPES),
                              ("video-qa", TIME_QUESTION_TYPES), ("video-qa-shuffled", TIME_QUESTION_TYPES),
                              ("asr", ("question", "caption")), ("spoken-qa", QUESTION_TYPES)):
        types = data["tasks"][task]["types"]
        assert list(types) == list(types_asked) and all(v["n"] == 1 for v in types.values())
        for qtype, v in [*types.items(), ("all", data["tasks"][task])]:
            chance = [f"{100 * v['chance']:.1f} %"] if task.startswith("video") else []  # the order-blind model's
            wer = [f"{100 * v['wer']:.1f} %"] if task == "asr" else []  # its own column, past the empty chance
            expected.append([task, qtype, str(v["n"]), str(v["correct"]), f"{100 * v['accuracy']:.1f} %", *chance,
                             *wer])
    assert rows == expected and not data["skipped"]
    overall = data["overall"]
    assert overall["n"] == 37 and overall["correct"] == sum(t["correct"] for t in data["tasks"].values())


def test_command_errors_are_one_line_before_loading(tmp_path, capsys):
    for args, message in ((["--suite", "nope"], "unknown suite 'nope'; known suites: shapes"),
                          (["--suite", "shapes", "--task", "speech-qa"],
                           "its tasks: asr, image-qa, spoken-qa, text-qa, video-qa, video-qa-shuffled"),
                          (["--suite", "shapes", "--json", str(tmp_path / "no" / "eval.json")],
                           "its folder does not exist")):
        # A checkpoint that does not exist: the error must come before any loading.
        assert main(["eval", "--checkpoint", str(tmp_path / "missing"), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and err.startswith("mm-llama: error: "), err


def test_the_chance_column_is_the_mean_of_the_items_chance():
    from mm_llama.evaluation.runner import Report
    from mm_llama.evaluation.tasks import EvalItem

    report = Report("shapes", 0, 2)
    for qtype, chance, right in (("motion", 0.5, True), ("motion", 0.5, True), ("count", 0.5, False),
                                 ("count", 1 / 3, True)):
        report.add(EvalItem("video-qa", qtype, f"q {qtype} {chance}", "a", scene=None, chance=chance),
                   "a" if right else "b")
    report.add(EvalItem("image-qa", "colour", "q", "a", scene=None), "a")
    tasks = report.to_json()["tasks"]
    assert tasks["video-qa"]["chance"] == pytest.approx((1.5 + 1 / 3) / 4)
    assert tasks["video-qa"]["types"]["count"]["chance"] == pytest.approx(5 / 12)
    assert tasks["image-qa"]["chance"] is None and tasks["image-qa"]["types"]["colour"]["chance"] is None
    table = report.table().splitlines()
    assert table[0].split()[-1] == "chance"
    assert table[2].split() == ["video-qa", "motion", "2", "2", "100.0", "%", "50.0", "%"]
    assert table[4].split() == ["video-qa", "all", "4", "3", "75.0", "%", "45.8", "%"]
    assert table[5].split() == ["image-qa", "colour", "1", "1", "100.0", "%"]
