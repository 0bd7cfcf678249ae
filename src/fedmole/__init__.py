"""fedmole: federated fine-tuning of LLMs with sparse mixtures of LoRA experts."""

__version__ = "0.1.0"
