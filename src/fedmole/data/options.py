"""Answer options for classification data: checking a row's `options` and
finding the closed label set of a task.

A Natural Instructions subtask is treated as classification when its answers
form a small closed set, decided from the task's own targets (every reference
of every example in the task file, before any sampling):

- at least MIN_EXAMPLES examples;
- between 2 and MAX_LABELS distinct references;
- at least MIN_PER_LABEL examples per distinct reference on average
  (distinct <= examples / MIN_PER_LABEL), so a free-text task whose sample
  happens to repeat a few answers does not qualify.

Such a task's examples all get the sorted label set as `options`; in the
embedded data this selects the yes/no subtasks (018-022, 050, 052, 056, 057),
the answer-type and question-type subtasks (027, 046) and the multiple-choice
letter subtasks (043, 047).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from fedmole.data.types import Example

MIN_EXAMPLES = 20
MAX_LABELS = 16
MIN_PER_LABEL = 10


def parse_options(value: object, outputs: Sequence[str]) -> tuple[tuple[str, ...], str | None]:
    """A row's `options` field as (options, problem): absent/None -> ((), None); else a list of
    >= 2 distinct non-empty strings (stripped) that contains every reference answer, or a
    message saying what is wrong with it."""
    if value is None:
        return (), None
    if not isinstance(value, list):
        return (), f"field 'options' must be a list of strings, got {type(value).__name__}"
    if len(value) < 2:
        return (), f"field 'options' needs at least 2 choices, got {len(value)}"
    for i, opt in enumerate(value):
        if not isinstance(opt, str):
            return (), f"field 'options'[{i}] must be a string, got {type(opt).__name__}"
        if not opt.strip():
            return (), f"field 'options'[{i}] is empty"
    options = tuple(opt.strip() for opt in value)
    if len(set(options)) != len(options):
        return (), f"field 'options' lists a choice twice: {list(options)}"
    missing = [ref for ref in outputs if ref not in options]
    if missing:
        return (), f"answer {missing[0]!r} is not among the options {list(options)}"
    return options, None


def closed_label_set(examples: Sequence[Example]) -> tuple[str, ...] | None:
    """The sorted distinct references of a task when they form a small closed set (see the
    module docstring for the rule), else None."""
    labels = sorted({ref for ex in examples for ref in ex.outputs})
    n = len(examples)
    if n < MIN_EXAMPLES or not 2 <= len(labels) <= MAX_LABELS or len(labels) * MIN_PER_LABEL > n:
        return None
    return tuple(labels)


def with_closed_options(examples: list[Example]) -> list[Example]:
    """The examples of one task, each with the task's closed label set as options when it has one."""
    labels = closed_label_set(examples)
    if labels is None:
        return examples
    return [dataclasses.replace(ex, options=labels) for ex in examples]
