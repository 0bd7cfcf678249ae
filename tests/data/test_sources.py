"""Loading examples: user files and their error messages, hub layouts, task
selection, instruction modes, and the embedded NI loader on a fake cache."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from fedmole import assets
from fedmole.data.sources import (
    DataError,
    definition_only,
    hub_layout,
    hub_rows_to_examples,
    load_examples,
    map_hub_row,
    select_tasks,
)
from fedmole.data.types import Example

NI_PREFIX = (
    "Definition: In this task, you're given a passage. Your job is to write questions.  "
    "Things to Avoid: 1. Avoid questions with multiple answers. \n Emphasis/Caution: 1. Be clear.  "
    "Prompt: Write a question about the passage."
)


def write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_load_jsonl(tmp_path):
    rows = [
        {"instruction": " Say hi. ", "output": "hi", "task": "greet", "category": "chat"},
        {"instruction": "Add.", "input": "1 + 1", "output": ["2", "two"], "extra": 5},
    ]
    path = write(tmp_path, "d.jsonl", json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert load_examples(str(path)) == [
        Example("Say hi.", "", ("hi",), "chat", "greet", id="greet/0"),
        Example("Add.", "1 + 1", ("2", "two"), "", "default", id="d/1"),  # neither task nor category: the one default task
    ]


def test_load_json_and_csv(tmp_path):
    rows = [{"instruction": "Add.", "input": "1 + 1", "output": "2", "category": "math", "task": "add"}]
    expected = [Example("Add.", "1 + 1", ("2",), "math", "add", id="add/0")]
    assert load_examples(str(write(tmp_path, "d.json", json.dumps(rows)))) == expected
    csv_text = 'instruction,input,output,category,task\nAdd.,1 + 1,2,math,add\n"Say ""hi"",\nplease",,hi,,\n'
    assert load_examples(str(write(tmp_path, "d.csv", csv_text))) == expected + [
        Example('Say "hi",\nplease', "", ("hi",), "", "default", id="d/1")]


def test_options_in_every_file_format(tmp_path):
    row = {"instruction": "Is it red?", "input": "a cherry", "output": "yes", "options": [" yes", "no "]}
    expected = [Example("Is it red?", "a cherry", ("yes",), "", "default", id="d/0", options=("yes", "no"))]
    assert load_examples(str(write(tmp_path, "d.jsonl", json.dumps(row) + "\n"))) == expected
    assert load_examples(str(write(tmp_path, "d.json", json.dumps([row])))) == expected
    csv_text = 'instruction,input,output,options\nIs it red?,a cherry,yes,"[""yes"", ""no""]"\nSay.,,hi,\n'
    got = load_examples(str(write(tmp_path, "d.csv", csv_text)))
    assert got[0] == expected[0] and got[1].options == ()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": "x", "output": \n', "a.jsonl:2: invalid JSON"),
        ("a.jsonl", '{"instruction": "x", "output": "y"}\n\n{"output": "y"}\n', "a.jsonl:3: missing required field 'instruction'"),
        ("a.jsonl", '{"instruction": "  ", "output": "y"}\n', "a.jsonl:1: field 'instruction' is empty"),
        ("a.jsonl", '{"instruction": 3, "output": "y"}\n', "a.jsonl:1: field 'instruction' must be a string, got int"),
        ("a.jsonl", '{"instruction": "x"}\n', "a.jsonl:1: missing required field 'output'"),
        ("a.jsonl", '{"instruction": "x", "output": ""}\n', "a.jsonl:1: field 'output' is empty"),
        ("a.jsonl", '{"instruction": "x", "output": []}\n', "a.jsonl:1: field 'output' is an empty list"),
        ("a.jsonl", '{"instruction": "x", "output": ["a", 7]}\n', "a.jsonl:1: field 'output'[1] must be a string, got int"),
        ("a.jsonl", '{"instruction": "x", "output": {"a": 1}}\n', "a.jsonl:1: field 'output' must be a string or a list"),
        ("a.jsonl", '{"instruction": "x", "output": "y", "input": 4}\n', "a.jsonl:1: field 'input' must be a string, got int"),
        ("a.jsonl", '["x", "y"]\n', "a.jsonl:1: expected an object"),
        ("a.jsonl", "\n  \n", "a.jsonl: file is empty"),
        ("a.json", '[{"instruction": "x", "output": "y"}, {"instruction": "x"}]', "a.json: item 1: missing required field 'output'"),
        ("a.json", '{"instruction": "x", "output": "y"}', "a.json: expected a JSON list of objects, got dict"),
        ("a.json", '[\n{"instruction": "x",\n "output": y}]', "a.json:3: invalid JSON"),
        ("a.csv", "instruction,output\nx,y\n,z\n", "a.csv:3: field 'instruction' is empty"),
        ("a.csv", "instruction,output\nx,y,z\n", "a.csv:2: row has more fields than the header"),
        ("a.csv", "instr,output\nx,y\n", "a.csv:2: missing required field 'instruction'"),
        ("a.csv", "instruction,output\n", "a.csv: file holds no examples"),
        ("a.jsonl", '{"instruction": "x", "output": "y", "options": "y"}\n', "a.jsonl:1: field 'options' must be a list"),
        ("a.jsonl", '{"instruction": "x", "output": "y", "options": ["y"]}\n', "a.jsonl:1: field 'options' needs at least 2 choices, got 1"),
        ("a.jsonl", '{"instruction": "x", "output": "y", "options": ["y", 2]}\n', "a.jsonl:1: field 'options'[1] must be a string"),
        ("a.jsonl", '{"instruction": "x", "output": "y", "options": ["y", " "]}\n', "a.jsonl:1: field 'options'[1] is empty"),
        ("a.jsonl", '{"instruction": "x", "output": "y", "options": ["y", "y "]}\n', "a.jsonl:1: field 'options' lists a choice twice"),
        ("a.jsonl", '{"instruction": "x", "output": ["y", "z"], "options": ["y", "n"]}\n',
         "a.jsonl:1: answer 'z' is not among the options ['y', 'n']"),
        ("a.csv", 'instruction,output,options\nx,y,"y, n"\n', "a.csv:2: field 'options' must be a JSON list"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, name, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    assert str(err.value).startswith(str(tmp_path / message.split(":")[0].split(" ")[0]))
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["b.jsonl", "b.csv"])
def test_not_utf8_names_the_line(tmp_path, name):
    row = b'{"instruction": "x", "output": "y"}\n'
    content = row + row + b'{"instruction": "caf\xe9"}\n' if name.endswith("jsonl") else b"instruction,output\nx,y\ncaf\xe9,ok\n"
    path = write(tmp_path, name, content, mode="wb")
    with pytest.raises(DataError, match=r"b\.(jsonl|csv):3: file is not UTF-8"):
        load_examples(str(path))


def test_unknown_source_lists_accepted_forms(tmp_path):
    with pytest.raises(DataError, match="accepted:.*natural-instructions.*hf:NAME"):
        load_examples("dolly")
    with pytest.raises(DataError, match="cannot read"):
        load_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="instruction_mode"):
        load_examples("natural-instructions", instruction_mode="short")


def test_hub_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DataError, match=r"pip install 'fedmole\[hub\]'"):
        load_examples("hf:databricks/databricks-dolly-15k")


def test_hub_layouts():
    dolly = [{"instruction": "Name a color.", "context": "", "response": "Red", "category": "brainstorming"}]
    assert hub_rows_to_examples(dolly, dolly[0].keys(), "dolly") == [
        Example("Name a color.", "", ("Red",), "brainstorming", "brainstorming", id="brainstorming/0")
    ]
    sni = [
        {
            "task_name": "task001_quoref_question_generation",
            "id": "x",
            "definition": ["Write a question.", "About the passage."],
            "inputs": "Passage: A.",
            "targets": ["Who?"],
        }
    ]
    assert hub_layout(sni[0].keys()) == "super-natural-instructions"
    assert hub_rows_to_examples(sni, sni[0].keys(), "sni") == [
        Example("Write a question.\nAbout the passage.", "Passage: A.", ("Who?",), "quoref",
                "task001_quoref_question_generation", id="task001_quoref_question_generation/0")
    ]
    generic = {"instruction": "Add.", "input": "1+1", "output": "2", "other": 0}
    assert map_hub_row(generic, hub_layout(generic)) == {
        "instruction": "Add.",
        "input": "1+1",
        "output": "2",
        "category": None,
        "task": None,
        "options": None,
    }
    with pytest.raises(DataError, match=r"columns \['answer', 'question'\] match no known layout"):
        hub_layout(["question", "answer"])
    with pytest.raises(DataError, match=r"sni row 0: field 'output' is empty"):
        hub_rows_to_examples([{**sni[0], "targets": ""}], sni[0].keys(), "sni")


def _pool():
    return [Example(f"i{t}", f"x{k}", ("y",), "c", f"t{t}") for t in range(3) for k in range(20)]


def test_select_tasks_is_seeded_and_order_free():
    pool = _pool()
    a = select_tasks(pool, ["t2", "t0"], 5, seed=3)
    assert [ex.task for ex in a] == ["t2"] * 5 + ["t0"] * 5
    assert a == select_tasks(pool, ["t2", "t0"], 5, seed=3)
    assert a[:5] == select_tasks(pool, ["t2"], 5, seed=3)  # a task's sample ignores the others
    assert a != select_tasks(pool, ["t2", "t0"], 5, seed=4)
    assert len(select_tasks(pool, None, 50, seed=0)) == 60
    with pytest.raises(DataError, match=r"unknown task\(s\) \['t9'\]; 3 tasks available, e.g. t0, t1, t2"):
        select_tasks(pool, ["t9"], None, seed=0)


def test_missing_task_falls_back_to_category_then_one_task(tmp_path, caplog):
    caplog.set_level("INFO", logger="fedmole")
    rows = [{"instruction": "Q.", "output": "a", "category": f"c{i % 3}"} for i in range(9)]
    rows.append({"instruction": "Q.", "output": "a", "category": "c0", "task": "own"})
    rows.append({"instruction": "Q.", "output": "a"})
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    tasks = Counter(ex.task for ex in load_examples(str(path)))
    assert tasks == {"c0": 3, "c1": 3, "c2": 3, "own": 1, "default": 1}
    assert "9 of 11 rows have no `task` field: their `category` is their task" in caplog.text
    assert "1 of 11 rows have neither `task` nor `category`: they form one task 'default'" in caplog.text


def test_a_cap_that_drops_rows_says_how_many(caplog):
    caplog.set_level("INFO", logger="fedmole")
    select_tasks(_pool(), None, 20, seed=0)
    assert "max_per_task" not in caplog.text  # nothing dropped, nothing said
    select_tasks(_pool(), ["t0", "t1"], 8, seed=0)
    assert "data.tasks keeps 2 of 3 tasks: 20 rows of the other tasks left out" in caplog.text
    assert "data.max_per_task = 8 keeps 16 of 40 rows (24 dropped, in 2 of 2 tasks)" in caplog.text


def test_definition_only():
    assert definition_only(NI_PREFIX) == "In this task, you're given a passage. Your job is to write questions."
    assert definition_only("Definition: Only a definition. ") == "Only a definition."
    assert definition_only(" Summarise the text. ") == "Summarise the text."
    text = "Definition: Label it.  Positive Examples: Input: a Output: b"
    assert definition_only(text) == "Label it."


def test_instruction_mode_on_a_file(tmp_path):
    path = write(tmp_path, "d.jsonl", json.dumps({"instruction": NI_PREFIX, "input": "P", "output": "Q"}) + "\n")
    assert load_examples(str(path))[0].instruction == NI_PREFIX
    assert load_examples(str(path), instruction_mode="definition")[0].instruction == definition_only(NI_PREFIX)


def test_natural_instructions_from_cache(monkeypatch, tmp_path):
    index = {}
    for t in ("subtask001_quoref_question_generation", "subtask002_quoref_answer_generation"):
        rows = [  # subtask001: 30 distinct answers (free text); subtask002: yes/no (a closed set)
            {"instruction": NI_PREFIX, "input": f"{t} {k}", "output": [f"a{k}" if t.startswith("subtask001") else
                                                                       ("Yes." if k % 3 else "No.")],
             "category": "quoref", "task": t, "task_type": "x"}
            for k in range(30)
        ]
        (tmp_path / f"{t}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        index[t] = {"count": 30, "category": "quoref", "task_type": "x"}
    (tmp_path / "index.json").write_text(json.dumps(index))
    monkeypatch.setattr(assets, "prepare_natural_instructions", lambda force=False: tmp_path)

    assert len(load_examples("natural-instructions")) == 60
    some = load_examples("natural-instructions", tasks=["subtask002_quoref_answer_generation"], max_per_task=4, seed=1)
    assert len(some) == 4 and {ex.task for ex in some} == {"subtask002_quoref_answer_generation"}
    assert all(ex.options == ("No.", "Yes.") for ex in some)  # decided on the whole task, not the sample
    everything = load_examples("natural-instructions")
    assert [ex.options for ex in everything[:30]] == [()] * 30
    assert everything[31].id == "subtask002_quoref_answer_generation/1"
    assert len({ex.id for ex in everything}) == 60
    assert {ex.id for ex in some} <= {ex.id for ex in everything}  # sampling keeps the source row ids
    assert some == load_examples("natural-instructions", tasks=["subtask002_quoref_answer_generation"], max_per_task=4, seed=1)
    short = load_examples("natural-instructions", max_per_task=2, instruction_mode="definition")
    assert len(short) == 4 and short[0].instruction.startswith("In this task") and short[0].category == "quoref"
    with pytest.raises(DataError, match="unknown task.*subtask001_quoref_question_generation"):
        load_examples("natural-instructions", tasks=["subtask999_nope"])


@pytest.mark.slow
def test_embedded_natural_instructions():
    root = assets.prepare_natural_instructions()
    index = json.loads((root / "index.json").read_text())
    assert len(index) == 61 and sum(v["count"] for v in index.values()) == 193_249
    exs = load_examples("natural-instructions", tasks=["subtask061_ropes_answer_generation"], max_per_task=10)
    assert len(exs) == 10 and all(ex.category == "ropes" and ex.outputs for ex in exs)
