"""Generated tasks: stable ids, options that hold the answer, seeded content."""

import pytest

from fedmole.data.synthetic import TASKS, synthetic_examples


def test_ids_options_and_seeding():
    exs = synthetic_examples(per_task=30, seed=3)
    assert len(exs) == 30 * len(TASKS) and len({ex.id for ex in exs}) == len(exs)
    assert exs[31].id == f"{list(TASKS)[1]}/1"
    for ex in exs:
        assert not ex.options or ex.outputs[0] in ex.options
    assert {ex.task for ex in exs if ex.options} >= {"has_animal", "count_words", "first_kind"}
    assert exs == synthetic_examples(per_task=30, seed=3) and exs != synthetic_examples(per_task=30, seed=4)
    with pytest.raises(ValueError, match="unknown synthetic task 'nope'"):
        synthetic_examples(["nope"])
