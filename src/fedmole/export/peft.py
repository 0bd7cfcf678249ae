"""Single-LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

PEFT computes h = W0 x + (lora_alpha / r) B A x per target module, with keys
`base_model.model.<module>.lora_A.weight` (r, d_in) and `.lora_B.weight`
(d_out, r), which is fedmole's LoRA at the exported tier's rank. FLoRA's
merged base deltas dW (d_out, d_in) join the LoRA exactly: dW = U S V^T is cut
to its numerically non-zero singular values and appended as extra rank
components, and the alpha/r scale is folded into B so every module runs at
scale 1 (lora_alpha = r). Nothing here needs PEFT installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedmole.adapters.inject import State, split_key
from fedmole.adapters.lora import LoRAAdapter
from fedmole.export.native import ExportError, adapter_kind

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _delta_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (q, d_in), B (d_out, q)) with B A = delta, q = the numerical rank of delta (float64 SVD)."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    tol = s.max().clamp_min(1e-300) * max(delta.shape) * torch.finfo(torch.float32).eps
    q = int((s > tol).sum())
    root = s[:q].sqrt()
    return root[:, None] * vh[:q], u[:, :q] * root


def peft_export(loaded, base_model_name: str) -> tuple[dict, State]:
    """(adapter_config, tensors) of a loaded single-LoRA run (`fedmole.inference.LoadedRun`)."""
    adapter = loaded.adapter
    if not isinstance(adapter, LoRAAdapter):
        raise ExportError(
            f"--format peft needs a single LoRA (fedit, hetlora, flexlora, flora, local, centralized); "
            f"{loaded.cfg.run.method} trains a {adapter_kind(adapter)} adapter (a mixture of LoRA experts), "
            "which PEFT cannot express: use --format fedmole"
        )
    rank = adapter.rank_of(loaded.k)
    scale = adapter.cfg.alpha / rank
    merged = {split_key(k)[0]: v for k, v in loaded.extras.items() if split_key(k)[1] == "merged"}
    folded = bool(merged)  # scale 1 for every module, alpha/r folded into B
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in adapter.layers.items():
        a = layer.lora_A[:rank].detach().to(torch.float64).cpu()  # (r, d_in)
        b = layer.lora_B[:, :rank].detach().to(torch.float64).cpu()  # (d_out, r)
        if folded:
            b = b * scale
        if name in merged:
            da, db = _delta_factors(merged[name])
            if b.abs().max() > 0:  # FLoRA restarts B at zero after each merge: skip an empty LoRA
                a, b = torch.cat([a, da]), torch.cat([b, db], dim=1)
            else:
                a, b = da, db
        pairs[name] = (a, b)

    width = max(a.shape[0] for a, _ in pairs.values()) if folded else rank
    tensors: State = {}
    for name, (a, b) in pairs.items():
        pad = width - a.shape[0]  # zero components: a common rank for every module, no effect on the output
        a = torch.nn.functional.pad(a, (0, 0, 0, pad))
        b = torch.nn.functional.pad(b, (0, pad))
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(torch.float32).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(torch.float32).contiguous()
    conv1d = any(type(layer.base_layer).__name__ == "Conv1D" for layer in adapter.layers.values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": width,
        "lora_alpha": float(width) if folded else float(adapter.cfg.alpha),
        "lora_dropout": float(adapter.cfg.dropout),
        "target_modules": sorted(adapter.layers),
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return config, tensors


def save_peft(out: str | Path, config: dict, tensors: State) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out
