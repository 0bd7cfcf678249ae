"""Load instruction-following examples from the embedded Natural Instructions,
a user file (JSONL / JSON / CSV), or a Hugging Face `datasets` name."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import re
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from fedmole.data.options import parse_options, with_closed_options
from fedmole.data.types import Example

log = logging.getLogger(__name__)

NI_SOURCE = "natural-instructions"
INSTRUCTION_MODES = ("full", "definition")
FILE_SUFFIXES = (".jsonl", ".json", ".csv")
ACCEPTED_SOURCES = (
    f"'{NI_SOURCE}' (embedded), a path ending {' / '.join(FILE_SUFFIXES)} with instruction/input/output "
    "fields, or 'hf:NAME[:split]' (Hugging Face datasets)"
)

# Section labels inside a Natural Instructions task prefix; "definition" mode keeps
# the text between "Definition:" and the first of these.
_NI_SECTIONS = (
    "Things to Avoid",
    "Emphasis/Caution",
    "Emphasis & Caution",
    "Emphasis",
    "Caution",
    "Prompt",
    "Positive Examples",
    "Negative Examples",
    "Examples",
)
_SECTION_RE = re.compile(r"(?:^|\s)(?:" + "|".join(re.escape(s) for s in _NI_SECTIONS) + r")\s*:")
_DEFINITION_RE = re.compile(r"^\s*Definition\s*:\s*")
DEFAULT_TASK = "default"  # the one task of rows that name neither a task nor a category


class DataError(ValueError):
    """Bad data or a bad data request; the message says where and what."""


def load_examples(
    source: str,
    *,
    tasks: list[str] | None = None,
    max_per_task: int | None = None,
    seed: int = 0,
    instruction_mode: str = "full",
) -> list[Example]:
    """Load examples from `source` (see ACCEPTED_SOURCES).

    `tasks` keeps only those task labels (in that order); `max_per_task` keeps a seeded
    random sample of at most that many examples per task (same sample for a task
    whatever other tasks are chosen); `instruction_mode` "definition" keeps only the
    Definition part of Natural-Instructions-style instructions.
    """
    if instruction_mode not in INSTRUCTION_MODES:
        raise DataError(f"instruction_mode must be one of {INSTRUCTION_MODES}, got {instruction_mode!r}")
    if max_per_task is not None and max_per_task < 1:
        raise DataError(f"max_per_task must be >= 1 or None, got {max_per_task}")
    if source == NI_SOURCE:
        examples = _load_natural_instructions(tasks, max_per_task, seed)
    elif source.startswith("hf:"):
        examples = select_tasks(default_tasks(_load_hub(source)), tasks, max_per_task, seed)
    elif source.lower().endswith(FILE_SUFFIXES):
        examples = select_tasks(default_tasks(read_file(source)), tasks, max_per_task, seed)
    else:
        raise DataError(f"unknown data source {source!r}; accepted: {ACCEPTED_SOURCES}")
    if instruction_mode == "definition":
        examples = [_with_instruction(ex, definition_only(ex.instruction)) for ex in examples]
    return examples


def definition_only(instruction: str) -> str:
    """The Definition section of an NI-style instruction, without its label.

    Instructions without section labels come back unchanged (stripped).
    """
    text = _DEFINITION_RE.sub("", instruction, count=1)
    m = _SECTION_RE.search(text)
    return (text[: m.start()] if m else text).strip()


def default_tasks(examples: list[Example]) -> list[Example]:
    """Give rows without a `task` their `category` as task, and rows with neither the task
    DEFAULT_TASK; each substitution is logged with its row count."""
    from_category = sum(1 for ex in examples if not ex.task and ex.category)
    unlabelled = sum(1 for ex in examples if not ex.task and not ex.category)
    if from_category:
        log.info("%d of %d rows have no `task` field: their `category` is their task", from_category, len(examples))
    if unlabelled:
        log.info("%d of %d rows have neither `task` nor `category`: they form one task %r",
                 unlabelled, len(examples), DEFAULT_TASK)
    if not (from_category or unlabelled):
        return examples
    return [ex if ex.task else dataclasses.replace(ex, task=ex.category or DEFAULT_TASK) for ex in examples]


def select_tasks(examples: list[Example], tasks: list[str] | None, max_per_task: int | None, seed: int) -> list[Example]:
    """Keep the examples of `tasks` (in that order) and at most `max_per_task` of each (drops are logged)."""
    by_task: dict[str, list[Example]] = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
    if tasks is not None:
        _check_known(tasks, list(by_task))
        left_out = sum(len(g) for t, g in by_task.items() if t not in tasks)
        if left_out:
            log.info("data.tasks keeps %d of %d tasks: %d rows of the other tasks left out",
                     len(tasks), len(by_task), left_out)
        by_task = {t: by_task[t] for t in tasks}
    if max_per_task is None:
        return [ex for group in by_task.values() for ex in group]
    kept = {t: _sample(group, max_per_task, seed, t) for t, group in by_task.items()}
    log_cap({t: len(rows) for t, rows in by_task.items()}, kept, max_per_task)
    return [ex for group in kept.values() for ex in group]


def log_cap(before: dict[str, int], after: dict[str, list], max_per_task: int) -> None:
    """One line saying how many rows `max_per_task` dropped, in how many tasks (nothing when none);
    `before`: each task's row count before the cap."""
    dropped = sum(before[t] - len(after[t]) for t in after)
    if dropped:
        capped = sum(before[t] > len(after[t]) for t in after)
        total = sum(before[t] for t in after)
        log.info("data.max_per_task = %d keeps %d of %d rows (%d dropped, in %d of %d tasks)",
                 max_per_task, total - dropped, total, dropped, capped, len(after))


def _sample(items: list, k: int, seed: int, task: str) -> list:
    if len(items) <= k:
        return items
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    keep = np.sort(rng.choice(len(items), size=k, replace=False))
    return [items[i] for i in keep]


def _check_known(tasks: list[str], known: list[str]) -> None:
    unknown = [t for t in tasks if t not in known]
    if unknown:
        shown = ", ".join(sorted(known)[:5]) + (", ..." if len(known) > 5 else "")
        raise DataError(f"unknown task(s) {unknown}; {len(known)} tasks available, e.g. {shown}")
    if len(set(tasks)) != len(tasks):
        raise DataError(f"tasks lists a task twice: {tasks}")


def _with_instruction(ex: Example, instruction: str) -> Example:
    return dataclasses.replace(ex, instruction=instruction)


def with_ids(examples: list[Example], source: str) -> list[Example]:
    """Each example without an id of its own gets "<task, else source>/<its row index in the source>"."""
    return [ex if ex.id else dataclasses.replace(ex, id=f"{ex.task or source}/{i}") for i, ex in enumerate(examples)]


# --------------------------------------------------------------------------- embedded NI


def _load_natural_instructions(tasks: list[str] | None, max_per_task: int | None, seed: int) -> list[Example]:
    from fedmole.assets import prepare_natural_instructions

    root = prepare_natural_instructions()
    index = json.loads((root / "index.json").read_text())
    if tasks is not None:
        _check_known(tasks, list(index))
    sizes: dict[str, int] = {}
    kept: dict[str, list[Example]] = {}
    for task in tasks if tasks is not None else list(index):  # one whole task in memory at a time
        rows = with_closed_options(read_file(root / f"{task}.jsonl"))  # before sampling: the whole task decides
        sizes[task] = len(rows)
        kept[task] = rows if max_per_task is None else _sample(rows, max_per_task, seed, task)
    if max_per_task is not None:
        log_cap(sizes, kept, max_per_task)
    return [ex for rows in kept.values() for ex in rows]


# --------------------------------------------------------------------------- user files


def read_file(path: str | Path, fmt: str | None = None) -> list[Example]:
    """Read a .jsonl / .json (list of objects) / .csv file of examples (`fmt`: jsonl | json | csv
    overrides the suffix).

    Errors name the place: `file:LINE:` for JSONL and CSV, `file: item I:` for JSON.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: file is not UTF-8 (undecodable byte 0x{raw[err.start]:02x}); re-save it as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    suffix = f".{fmt.lower().lstrip('.')}" if fmt else path.suffix.lower()
    if suffix == ".jsonl":
        examples = _read_jsonl(text, path)
    elif suffix == ".json":
        examples = _read_json(text, path)
    elif suffix == ".csv":
        examples = _read_csv(text, path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; accepted: {', '.join(FILE_SUFFIXES)}")
    if not examples:
        raise DataError(f"{path}: file holds no examples")
    return with_ids(examples, path.stem)


def _read_jsonl(text: str, path: Path) -> list[Example]:
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
        out.append(row_to_example(row, where))
    return out


def _read_json(text: str, path: Path) -> list[Example]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
    return [row_to_example(row, f"{path}: item {i}") for i, row in enumerate(rows)]


def _read_csv(text: str, path: Path) -> list[Example]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        out = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DataError(f"{where}: row has more fields than the header ({len(header)})")
            fields = {k: v for k, v in row.items() if v is not None}
            if "options" in fields:
                fields["options"] = _csv_options(fields["options"], where)
            out.append(row_to_example(fields, where))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {err}") from None
    return out


def _csv_options(cell: str, where: str) -> list | None:
    """A CSV `options` cell: empty, or a JSON list of strings such as ["yes", "no"]."""
    if not cell.strip():
        return None
    try:
        value = json.loads(cell)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list):
        raise DataError(f'{where}: field \'options\' must be a JSON list such as ["yes", "no"], got {cell!r}')
    return value


def row_to_example(row: object, where: str) -> Example:
    """Validate one {instruction, input?, output, category?, task?, options?, id?} record.

    `options` (a list of >= 2 distinct strings) must contain every reference answer; `id` (text)
    names the example in predictions (default: "<task, else the file's name>/<row index>")."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object with instruction/input/output fields, got {type(row).__name__}")
    instruction = _text(row, "instruction", where, required=True)
    text_input = _text(row, "input", where, required=False)
    outputs = _outputs(row.get("output"), where)
    category = _text(row, "category", where, required=False)
    task = _text(row, "task", where, required=False)
    options, problem = parse_options(row.get("options"), outputs)
    if problem:
        raise DataError(f"{where}: {problem}")
    return Example(instruction, text_input, outputs, category, task, id=_text(row, "id", where, required=False),
                   options=options)


def _text(row: Mapping, field: str, where: str, *, required: bool) -> str:
    value = row.get(field)
    if value is None:
        if required:
            raise DataError(f"{where}: missing required field {field!r}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value.strip()


def _outputs(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        raise DataError(f"{where}: missing required field 'output'")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field 'output' is empty")
        return (value.strip(),)
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'output' must be a string or a list of strings, got {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: field 'output' is an empty list")
    for i, ref in enumerate(value):
        if not isinstance(ref, str):
            raise DataError(f"{where}: field 'output'[{i}] must be a string, got {type(ref).__name__}")
        if not ref.strip():
            raise DataError(f"{where}: field 'output'[{i}] is empty")
    return tuple(ref.strip() for ref in value)


# --------------------------------------------------------------------------- Hugging Face hub

HUB_LAYOUTS = {
    "dolly": ("instruction", "context", "response", "category"),
    "super-natural-instructions": ("definition", "inputs", "targets", "task_name"),
    "generic": ("instruction", "output"),
}


def hub_layout(columns: Iterable[str]) -> str:
    """Name of the known layout (a HUB_LAYOUTS key) that `columns` match."""
    cols = set(columns)
    for name, needed in HUB_LAYOUTS.items():
        if cols.issuperset(needed):
            return name
    known = "; ".join(f"{k}: {', '.join(v)}" for k, v in HUB_LAYOUTS.items())
    raise DataError(f"dataset columns {sorted(cols)} match no known layout ({known})")


def map_hub_row(row: Mapping, layout: str) -> dict:
    """Rename one hub row of `layout` to the instruction/input/output/category/task fields."""
    if layout == "dolly":
        return {
            "instruction": row["instruction"],
            "input": row.get("context"),
            "output": row["response"],
            "category": row.get("category"),
            "task": row.get("category"),
        }
    if layout == "super-natural-instructions":
        definition = row["definition"]
        if isinstance(definition, list):  # the raw SNI task files store it as a list
            definition = "\n".join(definition)
        task = row["task_name"]
        from fedmole.assets import ni_task_parts

        return {
            "instruction": definition,
            "input": row.get("inputs"),
            "output": row["targets"],
            "category": ni_task_parts(task)[0] if isinstance(task, str) else task,
            "task": task,
        }
    if layout == "generic":
        return {k: row.get(k) for k in ("instruction", "input", "output", "category", "task", "options")}
    raise DataError(f"unknown hub layout {layout!r}; known: {', '.join(HUB_LAYOUTS)}")


def hub_rows_to_examples(rows: Iterable[Mapping], columns: Iterable[str], name: str) -> list[Example]:
    """Map and validate hub rows; errors name the dataset and row index."""
    layout = hub_layout(columns)
    return with_ids([row_to_example(map_hub_row(row, layout), f"{name} row {i}") for i, row in enumerate(rows)], name)


def _load_hub(source: str) -> list[Example]:
    spec = source[len("hf:") :]
    name, _, split = spec.partition(":")
    if not name:
        raise DataError(f"{source!r}: expected 'hf:NAME[:split]', e.g. 'hf:databricks/databricks-dolly-15k:train'")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"loading {source!r} needs the Hugging Face `datasets` package: pip install 'fedmole[hub]'"
        ) from None
    split = split or "train"
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # network, unknown name, unknown split: all surface here
        raise DataError(f"could not load hub dataset {name!r} split {split!r}: {type(err).__name__}: {err}") from None
    return hub_rows_to_examples(ds, ds.column_names, f"{name}[{split}]")
