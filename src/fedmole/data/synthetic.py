"""Small generated instruction tasks for smoke runs and tests (no files, seeded).

Each task is a string transformation a tiny model can learn in a few steps,
so the whole pipeline (partition, training, generation, ROUGE-L) can run in
seconds. Categories group the tasks into families for Dirichlet partitions.
"""

from __future__ import annotations

import numpy as np

from fedmole.data.types import Example

WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rain")

TASKS = {
    # name: (category, instruction, function of the word list)
    "reverse_words": ("order", "Reverse the order of the words.", lambda w: " ".join(reversed(w))),
    "first_word": ("select", "Write the first word.", lambda w: w[0]),
    "last_word": ("select", "Write the last word.", lambda w: w[-1]),
    "sort_words": ("order", "Sort the words alphabetically.", lambda w: " ".join(sorted(w))),
    "count_words": ("count", "How many words are there?", lambda w: str(len(w))),
    "uppercase": ("case", "Write the words in capital letters.", lambda w: " ".join(w).upper()),
    "repeat_first": ("select", "Repeat the first word twice.", lambda w: f"{w[0]} {w[0]}"),
    "count_letters": ("count", "How many letters does the first word have?", lambda w: str(len(w[0]))),
}


def synthetic_examples(tasks: list[str] | None = None, per_task: int = 64, seed: int = 0) -> list[Example]:
    """`per_task` examples for each named task (all tasks by default)."""
    names = list(TASKS) if not tasks else tasks
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task {unknown[0]!r}; available: {', '.join(TASKS)}")
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        category, instruction, fn = TASKS[name]
        for _ in range(per_task):
            words = [WORDS[i] for i in rng.choice(len(WORDS), size=int(rng.integers(2, 5)), replace=False)]
            out.append(Example(instruction, " ".join(words), (fn(words),), category=category, task=name))
    return out
