"""Report writing from a fake run directory."""

import json

from fedmole.reporting.report import format_bytes, write_report


def _write_run(run_dir, *, summary=True, usage=True):
    rounds = [
        {"round": 0, "rouge_l": 12.5, "exact_match": 1.0, "seconds": 3.0},
        {"round": 1, "train_loss": 2.4567, "comm_bytes_up": 2048, "comm_bytes_down": 4096, "seconds": 10.0},
        {"round": 2, "train_loss": 1.9876, "rouge_l": 34.56, "exact_match": 7.25, "comm_bytes_up": 2048,
         "comm_bytes_down": 4096, "seconds": 11.0, "lr": 0.0003},
    ]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rounds) + "\n")
    if not summary:
        return
    data = {
        "method": "flame",
        "engine": "local",
        "rounds": 2,
        "seed": 7,
        "metrics": {"rouge_l": 34.56, "exact_match": 7.25},
        "baseline_metrics": {"rouge_l": 12.5, "exact_match": 1.0},
        "per_client": {
            "client_0": {"rouge_l": 40.0, "exact_match": 10.0, "tier": 8, "n": 20,
                         "by_tier": {"8": {"rouge_l": 40.0}, "2": {"rouge_l": 31.0}}},
            "client_1": {"rouge_l": 29.12, "exact_match": 4.5, "tier": 2, "n": 20,
                         "by_tier": {"8": {"rouge_l": 35.5}, "2": {"rouge_l": 29.12}}},
        },
        "per_tier": {"8": {"rouge_l": 40.0, "exact_match": 10.0, "clients": ["client_0"]},
                     "2": {"rouge_l": 29.12, "exact_match": 4.5, "clients": 1}},
        "comm_bytes": {"up": 4096, "down": 3 * 1024 * 1024},
        "wall_seconds": 3725.0,
        "compute": {"per_tier": {"8": {"step_seconds": 0.25, "samples": [0.2, 0.25, 0.3], "steps": 30,
                                       "flops_per_token": 4.0e8},
                                 "2": {"step_seconds": 0.125, "samples": [0.125], "steps": 10,
                                       "flops_per_token": 1.0e8}}},
        "final_state_sha256": "abc123",
    }
    if usage:
        data["expert_usage"] = {"client_0": [0.5, 0.25, 0.125, 0.125], "client_1": [0.9, 0.1]}
    (run_dir / "summary.json").write_text(json.dumps(data))


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 1024 * 1024) == "3.00 MiB"
    assert format_bytes(5 * 1024**3) == "5.00 GiB"


def test_full_report(tmp_path):
    _write_run(tmp_path)
    path = write_report(tmp_path)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert text.startswith("# fedmole run: flame")
    assert "| rouge_l | 12.50 | 34.56 | +22.06 |" in text  # before / after / change
    assert "| exact_match | 1.00 | 7.25 | +6.25 |" in text
    assert "| 2 | 1 | 29.12 | 4.50 |" in text  # tier 2 row, clients given as a count
    assert "| 8 | 1 | 40.00 | 10.00 |" in text  # tier 8 row, clients given as a list
    assert "| client_1 | 2 | 29.12 | 4.50 | 20 |" in text
    assert "| client_0 (k=8) | 40.00 * | 31.00 |" in text and "| client_1 (k=2) | 35.50 | 29.12 * |" in text
    assert "| 8 | 250.0 ms | 1.00 | 400 | 1.00 | 3 | 30 |" in text
    assert "| 2 | 125.0 ms | 0.50 | 100 | 0.25 | 1 | 10 |" in text
    assert "2.457" in text and "1.988" in text and "lr" in text  # per-round table keeps extra fields
    assert "4.00 KiB" in text and "3.00 MiB" in text
    assert "1:02:05" in text  # wall time
    assert "abc123" in text
    assert "](plot_metric.png)" in text and "](plot_expert_usage.png)" in text
    for name in ("plot_metric.png", "plot_expert_usage.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_optional_fields(tmp_path):
    _write_run(tmp_path, summary=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "train_lo')  # a run killed mid-write
    text = write_report(tmp_path).read_text()
    assert "# fedmole run: unknown method" in text
    assert "## Per tier" not in text and "## Per client" not in text
    assert "12.00 KiB" in text  # communication summed from the rounds
    assert (tmp_path / "plot_metric.png").exists()
    assert not (tmp_path / "plot_expert_usage.png").exists()
    assert "plot_expert_usage.png" not in text


def _png_size(path):
    head = path.read_bytes()[:24]
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_personalised_report_and_per_module_usage(tmp_path):
    """FedAMoLE: protocol named, each client's model fingerprint, no tiers, a heatmap per shown module
    wide enough for long client names."""
    _write_run(tmp_path, usage=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    long_names = ["subtask043_essential_terms_answering_incomplete_questions", "subtask050_multirc_answerability"]
    summary.update(method="fedamole", protocol="personalized", per_tier={}, per_client={
        name: {"rouge_l": 10.0, "exact_match": 0.0, "tier": 8, "n": 4, "state_sha256": f"{i}" * 64}
        for i, name in enumerate(long_names)})
    modules = [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    summary["expert_usage"] = {name: {m: {"3": 0.75, "17": 0.25} for m in modules} for name in long_names}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    text = write_report(tmp_path).read_text()
    assert "- evaluation protocol: `personalized`" in text and "## Per tier" not in text
    assert "| model sha256 |" in text and "| `111111111111` |" in text
    width, height = _png_size(tmp_path / "plot_expert_usage.png")
    assert width > 1000 and height > 300  # labels beside 18 readable columns, two module panels


def test_usage_heatmap_grows_with_its_labels(tmp_path):
    _write_run(tmp_path)
    write_report(tmp_path)
    short, _ = _png_size(tmp_path / "plot_expert_usage.png")
    summary = json.loads((tmp_path / "summary.json").read_text())
    summary["expert_usage"] = {"x" * 60 + str(i): u for i, u in enumerate(summary["expert_usage"].values())}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    write_report(tmp_path)
    wide, _ = _png_size(tmp_path / "plot_expert_usage.png")
    assert wide > short + 200  # the heatmap keeps its width instead of yielding it to the labels
