"""fedmole: federated fine-tuning of LLMs with sparse mixtures of LoRA experts.

`fedmole.load_adapter(model, path, tier=K)` loads an adapter written by
`fedmole export --format fedmole` into a base model (imported on first use,
so `import fedmole` stays free of torch).
"""

import os

__version__ = "0.1.0"

# oneDNN (torch's CPU matmuls) compiles a kernel per matmul shape and keeps 1,024 of them; the
# grouped expert matmuls of a sparse MoE use a few thousand shapes (fedmole.adapters.moe_lora.
# ROW_BUCKET), so a larger cache. Read when the first matmul runs; a value set by the user wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")


def __getattr__(name: str):
    if name == "load_adapter":
        from fedmole.export.native import load_adapter

        return load_adapter
    raise AttributeError(f"module 'fedmole' has no attribute {name!r}")


__all__ = ["__version__", "load_adapter"]
