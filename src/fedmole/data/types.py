"""Plain data records shared by the data, evaluation and engine layers."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One instruction-following example.

    `outputs` holds every reference answer; the first one is the training
    target, all of them count at evaluation (ROUGE-L takes the max).
    `options`, when given, is the closed set of answers: evaluation then
    picks the option with the lowest LM loss instead of generating, and
    every reference is one of them.
    """

    instruction: str
    input: str
    outputs: tuple[str, ...]
    category: str = ""  # coarse label used by Dirichlet partitions
    task: str = ""  # fine label (e.g. the Natural Instructions subtask)
    id: str = ""  # stable id, "<task or source>/<row index in the source>", set at load time
    options: tuple[str, ...] = ()  # answer choices for classification data (empty: generate)


@dataclass
class ClientData:
    """One client's seeded splits."""

    client_id: int
    name: str
    train: list[Example]
    aux: list[Example]  # small held-out split for no-grad passes (FedAMoLE embeddings)
    val: list[Example]
    test: list[Example]
    tasks: list[str] = field(default_factory=list)

    @property
    def num_train(self) -> int:
        return len(self.train)
