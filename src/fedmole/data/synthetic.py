"""Small generated instruction tasks for smoke runs and tests (no files, seeded).

Each task is a function of a short list of words, so the whole pipeline
(partition, training, generation or option scoring, metrics) runs in seconds.
Generation tasks ask for a string (reversed words, the first word, ...);
classification tasks carry their answer set as `options` and are scored by
LM loss over the options, which a tiny model learns within a few dozen steps
(the answer depends on which words are present), so short runs already tell
training budgets and methods apart. Categories group the tasks into families
for Dirichlet partitions.
"""

from __future__ import annotations

import numpy as np

from fedmole.data.types import Example

WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rain")
ANIMALS = {"cat", "dog", "fish", "bird"}
COLORS = {"red", "blue", "green"}
SKY = {"sun", "moon", "star", "rain", "bird"}


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _kind(word: str) -> str:
    return "color" if word in COLORS else "animal" if word in ANIMALS else "thing"


TASKS = {
    # name: (category, instruction, function of the word list, options or () for generation)
    "reverse_words": ("order", "Reverse the order of the words.", lambda w: " ".join(reversed(w)), ()),
    "first_word": ("select", "Write the first word.", lambda w: w[0], ()),
    "last_word": ("select", "Write the last word.", lambda w: w[-1], ()),
    "sort_words": ("order", "Sort the words alphabetically.", lambda w: " ".join(sorted(w)), ()),
    "uppercase": ("case", "Write the words in capital letters.", lambda w: " ".join(w).upper(), ()),
    "repeat_first": ("select", "Repeat the first word twice.", lambda w: f"{w[0]} {w[0]}", ()),
    "count_words": ("count", "How many words are there?", lambda w: str(len(w)), ("2", "3", "4")),
    "count_letters": ("count", "How many letters does the first word have?", lambda w: str(len(w[0])),
                      ("3", "4", "5")),
    "has_animal": ("detect", "Is an animal named? Answer yes or no.", lambda w: _yes(bool(ANIMALS & set(w))),
                   ("yes", "no")),
    "has_color": ("detect", "Is a color named? Answer yes or no.", lambda w: _yes(bool(COLORS & set(w))),
                  ("yes", "no")),
    "has_sky": ("detect", "Is something in the sky named? Answer yes or no.", lambda w: _yes(bool(SKY & set(w))),
                ("yes", "no")),
    "first_kind": ("select", "Is the first word a color, an animal or a thing?", lambda w: _kind(w[0]),
                   ("color", "animal", "thing")),
}


def synthetic_examples(tasks: list[str] | None = None, per_task: int = 64, seed: int = 0) -> list[Example]:
    """`per_task` examples for each named task (all tasks by default), with ids "<task>/<i>"."""
    names = list(TASKS) if not tasks else tasks
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task {unknown[0]!r}; available: {', '.join(TASKS)}")
    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        category, instruction, fn, options = TASKS[name]
        for i in range(per_task):
            words = [WORDS[j] for j in rng.choice(len(WORDS), size=int(rng.integers(2, 5)), replace=False)]
            out.append(Example(instruction, " ".join(words), (fn(words),), category=category, task=name,
                               id=f"{name}/{i}", options=options))
    return out
