"""Run an evaluation suite with an `Assistant` and report accuracy per task and question type.

    report = evaluate(Assistant.from_pretrained("demo"), suite="shapes", n_per_type=50)
    print(report.table()); json.dump(report.to_json(), f)

Every question is asked alone, greedily, as a user of `Assistant.ask` would; an answer counts when it equals the
expected one after stripping surrounding whitespace (the world's answers are exact).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from mm_llama.evaluation.tasks import EvalItem, Task, suite_tasks

__all__ = ["Report", "evaluate"]

_WRONG_KEPT = 5  # wrong answers kept per task, to show what goes wrong


@dataclass
class Report:
    suite: str
    seed: int
    n_per_type: int
    checkpoint: str | None = None
    counts: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # task -> type -> [correct, asked]
    wrong: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # task -> a few {question, expected, got}
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why

    def add(self, item: EvalItem, got: str) -> None:
        ok = got.strip() == item.answer
        cell = self.counts.setdefault(item.task, {}).setdefault(item.qtype, [0, 0])
        cell[0] += ok
        cell[1] += 1
        kept = self.wrong.setdefault(item.task, [])
        if not ok and len(kept) < _WRONG_KEPT:
            kept.append({"type": item.qtype, "question": item.question, "expected": item.answer, "got": got.strip()})

    def task_total(self, task: str) -> tuple[int, int]:
        cells = self.counts.get(task, {}).values()
        return sum(c for c, _ in cells), sum(n for _, n in cells)

    def table(self) -> str:
        """A plain-text table: task | question type | n | correct | accuracy, with each task's "all" row."""
        rows = [("task", "question type", "n", "correct", "accuracy")]
        for task, types in self.counts.items():
            for qtype, (correct, n) in types.items():
                rows.append((task, qtype, str(n), str(correct), f"{100 * correct / n:.1f} %"))
            correct, n = self.task_total(task)
            rows.append((task, "all", str(n), str(correct), f"{100 * correct / n:.1f} %"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for j, row in enumerate(rows):
            cells = [row[i].ljust(widths[i]) if i < 2 else row[i].rjust(widths[i]) for i in range(5)]
            lines.append("  ".join(cells).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += [f"{task}: skipped ({why})" for task, why in self.skipped.items()]
        return "\n".join(lines)

    def to_json(self) -> dict:
        tasks = {}
        for task, types in self.counts.items():
            correct, n = self.task_total(task)
            tasks[task] = {"n": n, "correct": correct, "accuracy": correct / n,
                           "types": {t: {"n": n_t, "correct": c, "accuracy": c / n_t} for t, (c, n_t) in types.items()}}
        return {"suite": self.suite, "seed": self.seed, "n_per_type": self.n_per_type, "checkpoint": self.checkpoint,
                "tasks": tasks, "skipped": self.skipped, "wrong": self.wrong}


def _media(assistant) -> set[str]:
    """The media the assistant's model takes besides text."""
    return {"text"} | ({"image"} if assistant.model.config.vision is not None else set())


def evaluate(assistant, suite: str = "shapes", *, n_per_type: int = 50, seed: int = 0, tasks: list[str] | None = None,
             progress: bool = True, checkpoint: str | None = None) -> Report:
    """Ask every item of the suite's tasks (or of `tasks`) and count the exact answers.

    Args:
        assistant: an `mm_llama.api.Assistant` (anything with `ask(question, image=..., max_new_tokens=...)`,
            `.tokenizer` and `.model.config`).
        suite: a key of `SUITES`.
        n_per_type: questions per question type of each task.
        seed: the held-out items drawn; the same seed asks the same questions.
        tasks: task names to run (default: all of the suite's).
        progress: a progress bar on stderr.
        checkpoint: recorded in the report.
    Returns:
        the Report; a task whose medium the model lacks (an image task for a text-only trunk) is skipped and said so.
    """
    report = Report(suite, seed, n_per_type, checkpoint)
    chosen: list[Task] = suite_tasks(suite, tasks)
    media = _media(assistant)
    items = []
    for task in chosen:
        if task.medium not in media:
            report.skipped[task.name] = f"the model takes no {task.medium}"
            continue
        items += task.items(n_per_type, seed)
    if not items:
        return report
    # Room for the longest expected answer and its end token, with slack to see what a wrong answer goes on to say.
    max_new = max(len(assistant.tokenizer.encode(i.answer, bos=False, eos=False)) for i in items) + 16
    for item in tqdm(items, desc=f"eval {suite}", unit="question", disable=not progress, file=sys.stderr):
        report.add(item, assistant.ask(item.question, image=item.image, max_new_tokens=max_new))
    return report
