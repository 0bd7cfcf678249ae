"""fedmole: federated fine-tuning of LLMs with sparse mixtures of LoRA experts.

`fedmole.load_adapter(model, path, tier=K)` loads an adapter written by
`fedmole export --format fedmole` into a base model (imported on first use,
so `import fedmole` stays free of torch).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_adapter":
        from fedmole.export.native import load_adapter

        return load_adapter
    raise AttributeError(f"module 'fedmole' has no attribute {name!r}")


__all__ = ["__version__", "load_adapter"]
