"""Export: PEFT adapters whose logits equal fedmole's, the fedmole format and
`fedmole.load_adapter`, merged models (single LoRA, LoRA on MoE experts), refusals."""

import json

import pytest
import torch

import fedmole
from fedmole.config import load_config
from fedmole.engine.local import run_local
from fedmole.export import ExportError, export_run
from fedmole.inference import RunError, load_run
from fedmole.models import load_base

SMALL = ["rounds=1", "run.progress=false", "train.local_steps=2", "data.num_clients=3", "fed.tiers=[4,2,1]",
         "data.max_test=2", "eval.max_new_tokens=2", "data.max_per_task=24"]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run per (config, method), built once per module."""
    runs = {}

    def get(method: str, config: str = "configs/tiny.toml", *extra: str):
        key = (method, config, extra)
        if key not in runs:
            path = tmp_path_factory.mktemp(method)
            run_local(load_config(config, [*SMALL, f"method={method}", *extra]), path)
            runs[key] = path
        return runs[key]

    return get


def reference_logits(run_dir, **view):
    loaded = load_run(run_dir, device="cpu", **view)
    assert not any(m.training for m in loaded.model.modules())  # dropout off
    with torch.no_grad(), loaded.adapter.route(loaded.k):
        return loaded.model(input_ids=IDS).logits


def peft_logits(adapter_dir, model_name="tiny-llama"):
    from peft import PeftModel

    base, _ = load_base(model_name, seed=0)
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        return model(input_ids=IDS).logits, plain


@pytest.mark.parametrize("method,view", [
    ("fedit", {}),
    ("hetlora", {"tier": 2}),
    ("flexlora", {"tier": 1}),
    ("flora", {}),
    ("centralized", {}),
    ("local", {"client": 1}),
])
def test_peft_export_gives_fedmole_logits(finished, tmp_path, method, view):
    run = finished(method)
    (item,) = export_run(run, tmp_path / "p", fmt="peft", **view)
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (tmp_path / "p" / "adapter_model.safetensors").is_file()
    ref = reference_logits(run, **view)
    got, plain = peft_logits(tmp_path / "p")
    assert (ref - plain).abs().max() > 1e-4  # the adapter changes the model, so the comparison means something
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert item.tier == (view.get("tier") or load_run(run, device="cpu", **view).k)


def test_personalised_methods_export_one_adapter_per_client(finished, tmp_path):
    run = finished("local")
    items = export_run(run, tmp_path / "all", fmt="peft")
    assert len(items) == 3 and len({i.path for i in items}) == 3
    assert all((i.path / "adapter_model.safetensors").is_file() for i in items)
    with pytest.raises(RunError, match="choose one with --client; clients: 0 "):
        load_run(run)


def test_fedmole_format_loads_with_one_call(finished, tmp_path):
    run = finished("flame")
    for tier in (4, 1):
        export_run(run, tmp_path / f"k{tier}", fmt="fedmole", tier=tier)
        config = json.loads((tmp_path / f"k{tier}" / "fedmole-adapter.json").read_text())
        assert (config["kind"], config["tier"], config["tiers"], config["base_model"]) == ("mole", tier, [4, 2, 1],
                                                                                          "tiny-llama")
        model, _ = load_base("tiny-llama", seed=0)
        handle = fedmole.load_adapter(model, tmp_path / f"k{tier}")
        assert handle.model is model and not any(m.training for m in model.modules())
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=IDS).logits, reference_logits(run, tier=tier))
    model, _ = load_base("tiny-llama", seed=0)
    with pytest.raises(ExportError, match="tier=9: this adapter activates 1..4 experts per token"):
        fedmole.load_adapter(model, tmp_path / "k4", tier=9)
    with pytest.raises(ExportError, match="use --format fedmole"):
        export_run(run, tmp_path / "peft", fmt="peft")
    with pytest.raises(ExportError, match="gates g\\(x\\) that depend on each token"):
        export_run(run, tmp_path / "merged", merge=True)


def test_fedamole_exports_each_clients_own_model(finished, tmp_path):
    run = finished("fedamole", "configs/tiny.toml", "fedamole.pool_size=6", "fedamole.max_experts=4")
    items = export_run(run, tmp_path / "all")
    assert [i.format for i in items] == ["fedmole"] * 3
    model, _ = load_base("tiny-llama", seed=0)
    fedmole.load_adapter(model, items[2].path)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, reference_logits(run, client=items[2].client))
    with pytest.raises(ExportError, match="keys A_j x with the query W_t x"):
        export_run(run, tmp_path / "merged", merge=True, client=0)


def test_merged_single_lora_is_a_plain_model(finished, tmp_path):
    from transformers import AutoModelForCausalLM

    run = finished("flora")
    export_run(run, tmp_path / "m", merge=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, reference_logits(run), atol=1e-5, rtol=1e-5)


def test_merged_moe_lora_at_each_tier(finished, tmp_path):
    from transformers import AutoModelForCausalLM

    run = finished("flame", "configs/tiny-moe.toml", "model.name=tiny-qwen2-moe")
    for tier in (4, 2, 1):
        export_run(run, tmp_path / f"k{tier}", merge=True, tier=tier)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / f"k{tier}")
        assert model.config.num_experts_per_tok == tier
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=IDS).logits, reference_logits(run, tier=tier),
                                       atol=1e-5, rtol=1e-5)
    export_run(run, tmp_path / "native", fmt="fedmole", tier=2)
    model, _ = load_base("tiny-qwen2-moe", seed=0)
    fedmole.load_adapter(model, tmp_path / "native")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, reference_logits(run, tier=2))


def test_export_refuses_a_used_directory_and_unknown_clients(finished, tmp_path):
    run = finished("fedit")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_run(run, tmp_path / "busy")
    with pytest.raises(RunError, match="no client 'nobody' in this run; clients: 0 "):
        export_run(run, tmp_path / "p", client="nobody")
    (tmp_path / "config.toml").write_text("")  # a run that never finished
    with pytest.raises(RunError, match="holds no finished run .* `fedmole resume "):
        export_run(tmp_path, tmp_path / "p")


def test_personalised_flora_exports_the_clients_own_base_and_lora(finished, tmp_path):
    """A personalised FLoRA client is its own merged base (from round 1's merge) plus the LoRA it
    trained on it in round 2: the PEFT export folds in that base, not the server's later one."""
    run = finished("flora", "configs/tiny.toml", "rounds=2", "eval.protocol=personalized")
    (item,) = export_run(run, tmp_path / "p", fmt="peft", client=1)
    ref = reference_logits(run, client=1)
    got, plain = peft_logits(tmp_path / "p")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    loaded = load_run(run, client=1, device="cpu")
    assert loaded.extras and all(k.endswith(".merged") for k in loaded.extras)
    assert (ref - plain).abs().max() > 1e-4
