"""Run an evaluation suite with an `Assistant` and report accuracy per task and question type.

    report = evaluate(Assistant.from_pretrained("demo"), suite="shapes", n_per_type=50)
    print(report.table()); json.dump(report.to_json(), f)

Questions are asked greedily in batches (`Assistant.ask_batch`, whose answers equal `Assistant.ask`'s one by one); an
answer counts when it equals the expected one after stripping surrounding whitespace (the world's answers are exact).
Transcripts (items with metric "wer") are also counted in word errors (`mm_llama.evaluation.wer`): the report's WER
column.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from mm_llama.evaluation.tasks import MEDIA, EvalItem, Task, suite_tasks
from mm_llama.evaluation.wer import word_errors

__all__ = ["Report", "evaluate"]

_WRONG_KEPT = 5  # wrong answers kept per task, to show what goes wrong


@dataclass
class Report:
    """Counts of right answers per task and question type, a few wrong answers per task, and the skipped tasks.

    It knows tasks, types and strings only, never a medium. `table()` is for people, `to_json()` for files.
    """

    suite: str
    seed: int
    n_per_type: int
    checkpoint: str | None = None
    counts: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # task -> type -> [correct, asked]
    wrong: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # task -> a few {question, expected, got}
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why
    chance: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> type -> sum of the items' chance
    words: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # task -> type -> [word errors, words]

    def add(self, item: EvalItem, got: str) -> None:
        """Count `got`, the model's answer to `item`: right when it equals the expected answer, surrounding
        whitespace aside."""
        ok = got.strip() == item.answer
        cell = self.counts.setdefault(item.task, {}).setdefault(item.qtype, [0, 0])
        cell[0] += ok
        cell[1] += 1
        if item.chance is not None:
            expected = self.chance.setdefault(item.task, {})
            expected[item.qtype] = expected.get(item.qtype, 0.0) + item.chance
        if item.metric == "wer":
            errors, n_words = word_errors(item.answer, got)
            cell = self.words.setdefault(item.task, {}).setdefault(item.qtype, [0, 0])
            cell[0] += errors
            cell[1] += n_words
        kept = self.wrong.setdefault(item.task, [])
        if not ok and len(kept) < _WRONG_KEPT:
            kept.append({"type": item.qtype, "question": item.question, "expected": item.answer, "got": got.strip()})

    def task_total(self, task: str) -> tuple[int, int]:
        """(correct, asked) over every question type of `task`."""
        cells = self.counts.get(task, {}).values()
        return sum(c for c, _ in cells), sum(n for _, n in cells)

    def task_chance(self, task: str, qtype: str | None = None) -> float | None:
        """The mean chance of `task`'s items (of `qtype`, or all), as a fraction; None where items carry none."""
        sums = self.chance.get(task)
        if not sums:
            return None
        if qtype is not None:
            return sums[qtype] / self.counts[task][qtype][1]
        return sum(sums.values()) / self.task_total(task)[1]

    def task_wer(self, task: str, qtype: str | None = None) -> float | None:
        """Word errors / reference words of `task`'s transcripts (of `qtype`, or all), a fraction; None where it
        has none."""
        cells = self.words.get(task)
        if not cells:
            return None
        errors, n_words = cells[qtype] if qtype is not None else [sum(c[i] for c in cells.values()) for i in (0, 1)]
        return errors / n_words

    def table(self) -> str:
        """A plain-text table: task | question type | n | correct | accuracy | chance (where a task has one: the
        accuracy of a model blind to what it tests) and WER (where a task transcribes), with each task's "all"
        row."""
        def percent(value: float | None) -> str:
            return "" if value is None else f"{100 * value:.1f} %"

        rows = [("task", "question type", "n", "correct", "accuracy", "chance", "WER")]
        for task, types in self.counts.items():
            for qtype, (correct, n) in types.items():
                rows.append((task, qtype, str(n), str(correct), f"{100 * correct / n:.1f} %",
                             percent(self.task_chance(task, qtype)), percent(self.task_wer(task, qtype))))
            correct, n = self.task_total(task)
            rows.append((task, "all", str(n), str(correct), f"{100 * correct / n:.1f} %",
                         percent(self.task_chance(task)), percent(self.task_wer(task))))
        keep = [i for i in range(7) if i < 5 or (i == 5 and self.chance) or (i == 6 and self.words)]
        rows = [tuple(row[i] for i in keep) for row in rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for j, row in enumerate(rows):
            cells = [row[i].ljust(widths[i]) if i < 2 else row[i].rjust(widths[i]) for i in range(len(row))]
            lines.append("  ".join(cells).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += [f"{task}: skipped ({why})" for task, why in self.skipped.items()]
        return "\n".join(lines)

    def to_json(self) -> dict:
        """The report as JSON-ready data (accuracies are fractions, 0-1):

            {"suite", "seed", "n_per_type", "checkpoint",
             "tasks": {task: {"n", "correct", "accuracy", "chance", "types": {type: {"n", "correct", "accuracy",
                                                                                      "chance"}}}},
             # chance: the accuracy of a model blind to what the task tests (video: the order of frames), or None;
             # "wer" (tasks and types that transcribe): word errors / reference words
             "overall": {"n", "correct", "accuracy"},   # every question asked, all tasks together
             "skipped": {task: why}, "wrong": {task: [{"type", "question", "expected", "got"}]}}
        """
        tasks = {}
        for task, types in self.counts.items():
            correct, n = self.task_total(task)
            tasks[task] = {"n": n, "correct": correct, "accuracy": correct / n, "chance": self.task_chance(task),
                           "types": {t: {"n": n_t, "correct": c, "accuracy": c / n_t,
                                         "chance": self.task_chance(task, t)} for t, (c, n_t) in types.items()}}
            if task in self.words:
                tasks[task]["wer"] = self.task_wer(task)
                for t in types:
                    tasks[task]["types"][t]["wer"] = self.task_wer(task, t)
        correct, n = sum(t["correct"] for t in tasks.values()), sum(t["n"] for t in tasks.values())
        overall = {"n": n, "correct": correct, "accuracy": correct / n if n else None}  # None: every task skipped
        return {"suite": self.suite, "seed": self.seed, "n_per_type": self.n_per_type, "checkpoint": self.checkpoint,
                "tasks": tasks, "overall": overall, "skipped": self.skipped, "wrong": self.wrong}


def evaluate(assistant, suite: str = "shapes", *, n_per_type: int = 50, seed: int = 0, tasks: list[str] | None = None,
             progress: bool = True, checkpoint: str | None = None, batch_size: int = 32) -> Report:
    """Ask every item of the suite's tasks (or of `tasks`) and count the exact answers.

    Args:
        assistant: an `mm_llama.api.Assistant` (anything with `ask_batch(questions, images=..., max_new_tokens=...)`,
            `.tokenizer` and `.model.config`).
        suite: a key of `SUITES`.
        n_per_type: questions per question type of each task.
        seed: the held-out items drawn; the same seed asks the same questions.
        tasks: task names to run (default: all of the suite's).
        progress: a progress bar on stderr.
        checkpoint: recorded in the report.
        batch_size: questions asked together (`Assistant.ask_batch`; greedy answers equal asking one by one).
    Returns:
        the Report; a task whose medium the model lacks (an image task for a text-only trunk) is skipped and said so.
    """
    report = Report(suite, seed, n_per_type, checkpoint)
    chosen: list[Task] = suite_tasks(suite, tasks)
    items = []
    for task in chosen:
        if not MEDIA[task.medium](assistant.model.config):
            report.skipped[task.name] = f"the model takes no {task.medium}"
            continue
        items += task.items(n_per_type, seed)
    if not items:
        return report
    # Room for the longest expected answer and its end token, with slack to see what a wrong answer goes on to say.
    max_new = max(len(assistant.tokenizer.encode(i.answer, bos=False, eos=False)) for i in items) + 16
    with tqdm(total=len(items), desc=f"eval {suite}", unit="question", disable=not progress, file=sys.stderr) as bar:
        for chunk in _batches(items, batch_size):
            # Each medium keyword of `ask` ("image") becomes `ask_batch`'s list of one entry (or None) per question
            # ("images"), so a new medium needs no change here.
            kinds = sorted({kind for item in chunk for kind in item.media()})
            media = {f"{kind}s": [item.media().get(kind) for item in chunk] for kind in kinds}
            answers = assistant.ask_batch([item.text for item in chunk], **media, system=chunk[0].system,
                                          max_new_tokens=max_new)
            for item, answer in zip(chunk, answers, strict=True):
                report.add(item, answer)
            bar.update(len(chunk))
    return report


def _batches(items: list[EvalItem], size: int) -> list[list[EvalItem]]:
    """Consecutive items in batches of at most `size`, each with one system prompt (`ask_batch` takes one)."""
    out: list[list[EvalItem]] = []
    for item in items:
        if out and len(out[-1]) < size and out[-1][0].system == item.system:
            out[-1].append(item)
        else:
            out.append([item])
    return out
