"""Typed run configuration: dataclasses with defaults, loaded from TOML,
overridden with `key=value`, validated before any work starts.

Every field carries metadata: `help` (one line), and optionally `choices`
or `range` (inclusive bounds, None for open). Method-specific options live in
a table named after the method (e.g. `[flame]`), registered by the method.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the adapters import torch; the config must load without it (fast `fedmole --help`)
    from fedmole.adapters.inject import MoLEConfig


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def opt(default: Any, help: str, *, choices: tuple | None = None, range: tuple | None = None, factory=None):
    meta = {"help": help, "choices": choices, "range": range}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunSection:
    method: str = opt("flame", "federated algorithm (see `fedmole methods`)")
    engine: str = opt("local", "what moves the messages: local (one process) | flower-sim (Flower's Simulation "
                      "Engine, one virtual node per client)", choices=("local", "flower-sim"))
    payload_dtype: str = opt("float32", "dtype of adapter tensors on the wire (Flower engines; counts and "
                             "embeddings stay exact)", choices=("float32", "bfloat16"))
    rounds: int = opt(3, "federated rounds", range=(1, None))
    seed: int = opt(0, "seed of everything (data, sampling, init, dropout)", range=(0, None))
    out_dir: str = opt("runs", "parent folder of run directories")
    autocast: str = opt("auto", "mixed precision: auto (bf16 where the CPU supports it) | bf16 | off",
                        choices=("auto", "bf16", "off"))
    device: str = opt("auto", "torch device: auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    threads: int = opt(0, "torch CPU threads (0 = torch default); on flower-sim also the CPUs each client actor "
                       "claims (0 = all)", range=(0, None))
    progress: bool = opt(True, "show progress bars")
    tracker: str = opt("none", "per-round metrics to an experiment tracker: none | tensorboard (RUN_DIR/tensorboard) "
                       "| mlflow (MLFLOW_TRACKING_URI); needs the extra of that name", choices=("none", "tensorboard",
                                                                                               "mlflow"))


@dataclass
class ModelSection:
    name: str = opt("smollm2-135m-instruct",
                    "base model: smollm2-135m-instruct (embedded), tiny-llama, tiny-olmoe (and tiny-qwen2-moe, "
                    "tiny-qwen3-moe, tiny-mixtral), a local HF dir or a hub name")


@dataclass
class DataSection:
    source: str = opt("natural-instructions", "natural-instructions, synthetic, hf:NAME[:split], or a .jsonl/.json/.csv "
                      "file with fields instruction, input, output (text or list), category, task (default: the "
                      "category)")
    partition: str = opt("task", "how examples are split over clients: task (one task per client), dirichlet "
                         "(over categories), iid", choices=("task", "dirichlet", "iid"))
    num_clients: int = opt(6, "number of clients", range=(1, None))
    tasks: list[str] = opt(None, "tasks to use (task partition: one per client); empty = seeded pick",
                           factory=list)
    dirichlet_alpha: float = opt(1.0, "Dirichlet concentration over categories", range=(1e-6, None))
    min_client_size: int = opt(8, "minimum examples per client (Dirichlet)", range=(1, None))
    max_per_task: int = opt(0, "examples loaded per task (0 = all)", range=(0, None))
    max_train: int = opt(0, "training examples per client (0 = all)", range=(0, None))
    max_test: int = opt(32, "test examples per client (0 = all)", range=(0, None))
    max_val: int = opt(0, "validation examples per client (0 = all)", range=(0, None))
    val_frac: float = opt(0.1, "validation fraction", range=(0.0, 0.5))
    test_frac: float = opt(0.1, "test fraction", range=(0.0, 0.5))
    aux_frac: float = opt(0.04, "aux fraction: held out from training for no-grad passes (FedAMoLE's embeddings)",
                          range=(0.0, 0.5))
    aux_max: int = opt(200, "most aux examples per client (0 = no cap)", range=(0, None))
    max_len: int = opt(256, "tokens per training sequence (the instruction is truncated, never the answer)",
                       range=(16, None))
    max_answer_tokens: int = opt(64, "answer tokens kept for training", range=(1, None))
    instruction_mode: str = opt("full", "full instruction, or only its Definition part",
                                choices=("full", "definition"))
    chat_template: bool = opt(True, "use the tokenizer's chat template when it has one")


@dataclass
class AdapterSection:
    num_experts: int = opt(8, "LoRA experts per adapted module (E)", range=(1, 256))
    rank: int = opt(8, "rank of each expert (r)", range=(1, 1024))
    alpha: float = opt(16.0, "LoRA alpha (scale = alpha / r)", range=(0.0, None))
    dropout: float = opt(0.05, "dropout on the adapter input", range=(0.0, 0.9))
    targets: list[str] = opt(None, "module names to adapt, or ['all-linear']",
                             factory=lambda: ["q_proj", "v_proj"])
    router: str = opt("linear", "router: linear (softmax gate, FLAME) | key (<A_j x, W_t x>/sqrt(r), FedAMoLE's)",
                      choices=("linear", "key"))
    renormalize: bool = opt(False, "renormalise kept top-k gates")
    rescale: str = opt("learned", "tier rescaler", choices=("learned", "fixed", "off"))
    shared_expert: bool = opt(False, "add an always-on shared expert")
    aux_loss_weight: float = opt(1e-3, "load-balancing loss weight", range=(0.0, None))
    train_router: bool = opt(False, "MoE base: train a copy of the base router (else it stays frozen)")

    def mole(self, seed: int) -> MoLEConfig:
        from fedmole.adapters.inject import MoLEConfig

        return MoLEConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, init_seed=seed)


@dataclass
class TrainSection:
    local_steps: int = opt(10, "optimizer steps per client per round", range=(1, None))
    batch_size: int = opt(8, "sequences per step", range=(1, None))
    lr: float = opt(1e-3, "learning rate (of round 1; see lr_decay)", range=(0.0, 1.0))
    rescale_lr: float = opt(1e-2, "learning rate of the learned tier rescalers (their own optimizer group, no weight "
                            "decay: one scalar per tier and module moves too little at the LoRA rate)",
                            range=(0.0, 1.0))
    weight_decay: float = opt(0.0, "weight decay (decoupled for adamw, an L2 term for adam)", range=(0.0, None))
    grad_clip: float = opt(1.0, "gradient norm clip (0 = off)", range=(0.0, None))
    optimizer_state: str = opt("reset", "optimizer moments across rounds: reset (each round's local training starts a "
                               "fresh optimizer, as FedIT, FedAMoLE's code and FlowerTune do) | keep (a client "
                               "resumes its own moments, kept at rest with its state; not for flexlora, flora, "
                               "fedamole)", choices=("reset", "keep"))
    optimizer: str = opt("adamw", "local optimizer: adamw | adam (FedAMoLE's official recipe)",
                         choices=("adamw", "adam"))
    eps: float = opt(1e-8, "Adam epsilon (FedAMoLE's official recipe: 1e-6)", range=(0.0, 1.0))
    lr_decay: float = opt(1.0, "learning-rate factor per round, the same for every method: round t trains at "
                          "lr * lr_decay^(t-1) (FedAMoLE's official recipe: 0.99; 1 = constant)", range=(1e-6, 1.0))


@dataclass
class FedSection:
    tiers: list[int] = opt(None, "experts per token of each client, or tier values mixed by tier_proportions",
                           factory=lambda: [8, 4, 2, 1])
    tier_proportions: list[float] = opt(None, "share of clients per tier (same length as tiers); "
                                        "empty = one tier per client if lengths match, else equal shares",
                                        factory=list)
    sample_fraction: float = opt(1.0, "fraction of clients trained each round", range=(1e-6, 1.0))
    min_clients: int = opt(1, "fewest accepted replies for a round to count", range=(1, None))
    round_retries: int = opt(0, "times a round is redrawn when fewer than min_clients replies are accepted",
                             range=(0, None))
    client_timeout: float = opt(0.0, "seconds a client's local update may take by the wall clock; past it the "
                                "client is dropped from the round and its work discarded (0 = no limit)",
                                range=(0.0, None))
    tier_assignment: str = opt("fixed", "which client gets which tier: fixed (in client order) | shuffled "
                               "(permuted with run.seed, so a tier is not tied to a task)",
                               choices=("fixed", "shuffled"))
    round_timeout: float = opt(0.0, "Flower: seconds the server waits for one round's replies (0 = "
                               "fed.client_timeout x clients in the round + 60, or no limit without a client_timeout)",
                               range=(0.0, None))
    max_example_ratio: float = opt(1.0, "a reply may claim at most this x the training examples the server knows "
                                   "for its client (its split; on Flower what its node declared); 0 = no bound",
                                   range=(0.0, None))
    update_norm_factor: float = opt(10.0, "an update (distance from the state the client was sent) longer than "
                                    "this x the median of the round's other updates is rejected or clipped "
                                    "(0 = off, else >= 1)", range=(0.0, None))
    update_norm_action: str = opt("reject", "what happens to an update beyond fed.update_norm_factor",
                                  choices=("reject", "clip"))
    robust: str = opt("none", "robust aggregation: none | clip (every update clipped to the round's median "
                      "length) | trimmed_mean (the method's weighted averages become weighted trimmed means; "
                      "flame, fedit, hetlora)", choices=("none", "clip", "trimmed_mean"))
    trim_fraction: float = opt(0.1, "fed.robust = trimmed_mean: share of the weight cut from each end, per "
                               "coordinate", range=(0.0, 0.45))


@dataclass
class EvalSection:
    every: int = opt(0, "evaluate every N rounds (0 = before training and after the last round)",
                     range=(0, None))
    max_new_tokens: int = opt(32, "greedy decoding bound", range=(1, None))
    batch_size: int = opt(16, "prompts per generation batch", range=(1, None))
    max_prompt_tokens: int = opt(256, "prompt length cap at evaluation", range=(16, None))
    protocol: str = opt("auto", "what is evaluated: global (the aggregated model) | personalized (each client's "
                        "model after its latest local training, the '-FT' protocol) | auto (personalized for local "
                        "and fedamole, which have no global model to evaluate; global otherwise)",
                        choices=("auto", "global", "personalized"))
    tiers: str = opt("own", "evaluation: each client at its own tier (own), or every client's test set at "
                     "every tier's k in use (all: per-tier figures compare like with like)", choices=("own", "all"))
    before: bool = opt(True, "evaluate the model before training (round 0)")
    split: str = opt("test", "the split that is scored: test, or val (learning-rate pilots)",
                     choices=("test", "val"))


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    train: TrainSection = field(default_factory=TrainSection)
    fed: FedSection = field(default_factory=FedSection)
    eval: EvalSection = field(default_factory=EvalSection)
    methods: dict[str, Any] = field(default_factory=dict)  # method name -> its options dataclass
    explicit: dict[str, set[str]] = field(default_factory=dict, repr=False)  # section -> keys the user gave

    def method_options(self, name: str | None = None):
        return self.methods[name or self.run.method]

    def to_dict(self) -> dict:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out.update({name: dataclasses.asdict(o) for name, o in self.methods.items()})
        return out


SECTIONS = {f.name: f for f in dataclasses.fields(Config) if f.name not in ("methods", "explicit")}


def _method_registry() -> dict[str, type]:
    from fedmole.algorithms import METHOD_OPTIONS

    return METHOD_OPTIONS


def _method_classes() -> dict[str, type]:
    from fedmole.algorithms import METHODS

    return METHODS


def _check_value(where: str, f: dataclasses.Field, value: Any, hint: Any) -> Any:
    """Coerce/validate one value against its annotation and metadata."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {item.__name__}, got {value!r}")
        return [_check_scalar(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    value = _check_scalar(where, value, hint)
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where} = {value!r}; allowed: {', '.join(map(str, meta['choices']))}")
    if meta.get("range"):
        lo, hi = meta["range"]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(f"{where} = {value!r} is out of range; allowed: {bounds}")
    return value


def _check_scalar(where: str, value: Any, hint: Any) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # TOML has nan and inf; range checks would let nan through
            raise ConfigError(f"{where} = {value!r}; allowed: a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build_section(cls: type, table: dict, name: str):
    """Instantiate dataclass `cls` from a TOML table, rejecting unknown keys."""
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table, got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {name}.{unknown[0]}; allowed in [{name}]: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: _check_value(f"{name}.{k}", fields[k], v, hints[k]) for k, v in table.items()}
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'fed.tiers=[4,2]' -> (['fed', 'tiers'], [4, 2]); bare keys belong to [run]."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare words are strings
    path = key.split(".")
    if len(path) == 1:
        path = ["run", *path]
    if len(path) != 2:
        raise ConfigError(f"override key {key!r} must be SECTION.KEY (or a [run] key)")
    return path, value


def named_configs() -> dict[str, Any]:
    """The configs shipped inside the package (`fedmole run tiny`): name -> resource with `read_text`.

    The repository's configs/ folder holds the same files (a test keeps them identical).
    """
    from importlib.resources import files

    root = files("fedmole") / "configs"
    found = {f.name.removesuffix(".toml"): f for f in root.iterdir() if f.name.endswith(".toml")}
    return dict(sorted(found.items()))


def read_config_text(path: str | Path) -> str:
    """The TOML text of a config file, or of a named config when no such file exists."""
    p = Path(path)
    if p.is_file():
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    named = named_configs()
    if str(path) in named:
        return named[str(path)].read_text(encoding="utf-8")
    raise ConfigError(f"config file {p} does not exist, and it is not a named config ({', '.join(named)})")


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (what a run directory's config.toml holds)."""
    import tomli_w

    def clean(v):  # TOML has no null
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        return v

    return tomli_w.dumps(clean(cfg.to_dict()))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Load a TOML config file or a named config (or the defaults), apply overrides and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        text = read_config_text(path)
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for text in overrides:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"[{section}] must be a table")
        raw[section][key] = value

    registry = _method_registry()
    known = set(SECTIONS) | set(registry)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}]; allowed: {', '.join(sorted(known))}")
    cfg = Config(
        **{name: build_section(f.default_factory().__class__, raw.get(name, {}), name) for name, f in SECTIONS.items()},
        methods={name: build_section(cls, raw.get(name, {}), name) for name, cls in registry.items()},
        explicit={name: set(table) for name, table in raw.items() if isinstance(table, dict)},
    )
    if cfg.run.method not in registry:
        raise ConfigError(f"run.method = {cfg.run.method!r}; allowed: {', '.join(registry)}")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field rules."""
    if cfg.run.tracker != "none":
        import importlib.util

        if importlib.util.find_spec(cfg.run.tracker) is None:  # the package, not imported here
            raise ConfigError(f"run.tracker = {cfg.run.tracker!r} needs the {cfg.run.tracker} package: "
                              f"pip install 'fedmole[{cfg.run.tracker}]'")
    e = cfg.adapter.num_experts
    for t in cfg.fed.tiers:
        if not 1 <= t <= e:
            raise ConfigError(f"fed.tiers contains {t}; each tier must be in 1..adapter.num_experts ({e})")
    if not cfg.fed.tiers:
        raise ConfigError("fed.tiers is empty; give at least one tier (experts per token)")
    props = cfg.fed.tier_proportions
    if props:
        if len(props) != len(cfg.fed.tiers):
            raise ConfigError(
                f"fed.tier_proportions has {len(props)} entries but fed.tiers has {len(cfg.fed.tiers)}; they must match"
            )
        if any(p < 0 for p in props) or sum(props) <= 0:
            raise ConfigError(f"fed.tier_proportions = {props}; entries must be >= 0 with a positive sum")
    if 0 < cfg.fed.update_norm_factor < 1:
        raise ConfigError(f"fed.update_norm_factor = {cfg.fed.update_norm_factor}; allowed: 0 (off) or >= 1")
    if cfg.fed.robust == "trimmed_mean":
        if not _method_classes()[cfg.run.method].robust_averaging:
            raise ConfigError(f"fed.robust = 'trimmed_mean' does not apply to {cfg.run.method}, whose aggregation "
                              "is not a weighted average of the clients' tensors; allowed for: "
                              + ", ".join(n for n, c in _method_classes().items() if c.robust_averaging))
    refused = _method_classes()[cfg.run.method].keep_optimizer_refused
    if cfg.train.optimizer_state == "keep" and refused:
        raise ConfigError(f"train.optimizer_state = 'keep' does not apply to {cfg.run.method}: {refused}; "
                          "allowed: reset")
    if cfg.fed.min_clients > cfg.data.num_clients:
        raise ConfigError(
            f"fed.min_clients = {cfg.fed.min_clients} exceeds data.num_clients = {cfg.data.num_clients}"
        )
    if cfg.data.val_frac + cfg.data.test_frac + cfg.data.aux_frac >= 0.9:
        raise ConfigError("data.val_frac + data.test_frac + data.aux_frac must stay below 0.9")
    if cfg.data.partition == "task" and cfg.data.tasks and len(cfg.data.tasks) < cfg.data.num_clients:
        raise ConfigError(
            f"data.tasks lists {len(cfg.data.tasks)} tasks but data.num_clients = {cfg.data.num_clients}; "
            "the task partition needs one task per client"
        )
    if cfg.eval.tiers == "all" and cfg.run.engine != "local":
        raise ConfigError(f"eval.tiers = 'all' needs run.engine = 'local' (Flower nodes evaluate their own tier); "
                          f"run.engine = {cfg.run.engine!r}")
    if cfg.eval.max_prompt_tokens + cfg.eval.max_new_tokens > 4096:
        raise ConfigError("eval.max_prompt_tokens + eval.max_new_tokens must stay within 4096")
    from fedmole.algorithms import METHODS

    protocols = METHODS[cfg.run.method].protocols
    if cfg.eval.protocol not in ("auto", *protocols):
        raise ConfigError(f"eval.protocol = {cfg.eval.protocol!r}: {cfg.run.method} evaluates each client's own "
                          f"model and has no global one to evaluate; allowed: auto, {', '.join(protocols)}")
    check = getattr(cfg.method_options(), "check", None)  # the method's own cross-field rules
    if check is not None:
        check(cfg)
    from fedmole.assets import model_kind

    kind = model_kind(cfg.model.name)
    if kind is not None:
        check_adapter_options(cfg, moe=kind == "moe")


def check_adapter_options(cfg: Config, moe: bool) -> None:
    """Reject [adapter] options the user set to a non-default value that this method on this kind of
    base model ignores (an option that silently does nothing is a wrong result waiting to happen)."""
    from fedmole.algorithms import METHODS

    method = METHODS[cfg.run.method]
    used = method.adapter_options(moe)
    defaults = AdapterSection()
    for key in sorted(cfg.explicit.get("adapter", set()) - set(used)):
        value = getattr(cfg.adapter, key)
        if value != getattr(defaults, key):
            base = "a sparse MoE base model" if moe else "a dense base model"
            raise ConfigError(
                f"adapter.{key} = {value!r} has no effect for method {cfg.run.method!r} on {base} "
                f"({cfg.model.name}): {method.ignored_reason(key, moe)}; remove it (options used here: "
                f"{', '.join(f'adapter.{u}' for u in sorted(used))})"
            )


def eval_protocol(cfg: Config) -> str:
    """eval.protocol with `auto` resolved to the run method's own protocol."""
    from fedmole.algorithms import METHODS

    return METHODS[cfg.run.method].protocols[0] if cfg.eval.protocol == "auto" else cfg.eval.protocol


TIER_SHUFFLE_SALT = 7_919  # separates the tier permutation's stream from the other uses of run.seed


def assign_tiers(cfg: Config) -> list[int]:
    """Tier of each client: the list as given, or proportions by largest remainder (in client order);
    with fed.tier_assignment = shuffled, that list permuted with run.seed."""
    tiers = _tier_list(cfg)
    if cfg.fed.tier_assignment == "shuffled":
        import numpy as np

        order = np.random.default_rng([cfg.run.seed, TIER_SHUFFLE_SALT]).permutation(len(tiers))
        tiers = [tiers[i] for i in order]
    return tiers


def _tier_list(cfg: Config) -> list[int]:
    tiers, props, n = cfg.fed.tiers, cfg.fed.tier_proportions, cfg.data.num_clients
    if not props and len(tiers) == n:
        return list(tiers)
    props = props or [1.0] * len(tiers)
    total = sum(props)
    exact = [p / total * n for p in props]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(tiers)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    out: list[int] = []
    for tier, c in zip(tiers, counts):
        out += [tier] * c
    return out


def describe(cls: type = Config) -> list[str]:
    """Lines `section.key = default  # help` for documentation and `fedmole config`."""
    lines = []
    for name, f in SECTIONS.items():
        section = f.default_factory()
        for g in dataclasses.fields(section):
            lines.append(f"{name}.{g.name} = {getattr(section, g.name)!r}  # {g.metadata.get('help', '')}")
    for name, ocls in _method_registry().items():
        o = ocls()
        for g in dataclasses.fields(o):
            lines.append(f"{name}.{g.name} = {getattr(o, g.name)!r}  # {g.metadata.get('help', '')}")
    return lines


