"""The fedmole ServerApp: the local engine's round loop, with clients on Flower nodes.

`FlowerEngine` is `LocalEngine` with the client steps moved to the nodes: it
keeps the loop (select, configure, train, validate, aggregate, evaluate,
checkpoint), the reply checks and the aggregation, and replaces only the
transport hooks: training sends each selected client's Instruction to its node,
evaluation is a federated round in which every node evaluates its own test
split with `Method.eval_view` (so personalised evaluation uses the client's own
state, as on the local engine), and payload bytes are counted at the wire dtype.

Run config (`[tool.flwr.app.config]` in pyproject.toml, or `flwr run --run-config`):

    config         fedmole TOML config (relative to the working directory or the app)
    overrides      fedmole `key=value` overrides, space separated (shell quoting)
    out            run directory ("" = run.out_dir/METHOD-TIMESTAMP)
    node-wait      seconds to wait for data.num_clients nodes to connect, and for each
                   round's worth of nodes to answer the start-up queries (asked in turn)
    every fedmole option, keyed as in `key=value` overrides ([run] keys bare:
    `rounds`, `method`; the others SECTION.KEY: `fed.tiers`, `flame.t`); "" keeps
    the value of `config`. Flower's run config holds only numbers, booleans and
    strings, so lists and strings go in quotes: --run-config "rounds=5 fed.tiers='[4,2]'"
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from fedmole.config import Config, ConfigError, assign_tiers, describe, load_config
from fedmole.engine.clients import clients_per_round
from fedmole.engine.guard import ClientInfo, admit_eval
from fedmole.engine.local import LocalEngine, ResumeError, summarise
from fedmole.engine.setup import Setup
from fedmole.flower import serde
from fedmole.flower.strategy import FedmoleStrategy, describe_clients, discover_nodes
from fedmole.messages import Instruction, Reply, State
from fedmole.reporting.rundir import new_run_dir

log = logging.getLogger("fedmole")


class FlowerEngine(LocalEngine):
    """LocalEngine whose clients live on Flower nodes reached through `grid`."""

    def __init__(self, cfg: Config, run_dir: str | Path, grid: Grid, strategy: FedmoleStrategy, name: str,
                 clients: dict[int, ClientInfo]):
        self.name = name  # "flower-sim" (Simulation Engine) or "flower" (Deployment Engine)
        self.declared = dict(clients)  # what each client's node declared about its data (describe_clients)
        super().__init__(cfg, run_dir)
        self.grid = grid
        self.strategy = strategy

    def make_setup(self, cfg: Config) -> Setup:
        return Setup(cfg, clients=[])  # the server never loads client data; the nodes hold it

    def client_infos(self) -> dict[int, ClientInfo]:
        return self.declared

    def run(self, resume: bool = False) -> dict:
        if resume:
            raise ResumeError("a Flower run cannot be resumed: each client's state and batch position lived on "
                              "its node, not versioned with the server's checkpoints; start a new run")
        return super().run()

    def train_clients(self, rnd: int, instructions: list[Instruction]) -> tuple[dict[int, Message], dict[int, str]]:
        replies, failures = self.strategy.train(self.grid, instructions)
        for c, why in failures.items():
            log.warning("round %d: client %d failed: %s", rnd, c, why)
        return replies, failures

    def decode(self, raw: Message) -> Reply:
        return serde.read_reply(raw.content)

    def evaluate(self, global_state: State, rnd: int) -> dict:
        """Federated evaluation: each node scores its own test split; the server checks each result
        (engine/guard.py) and keys it by the client it asked, with the tier it assigned."""
        clients = list(range(self.cfg.data.num_clients))
        state = self.method.final_state(global_state)  # the whole trained model (FLoRA: with its merged base)
        replies, failures = self.strategy.evaluate(self.grid, rnd, state, clients, wave=self.per_round())
        per_client = {}
        for c, msg in replies.items():
            metrics, why = admit_eval(lambda: serde.read_result(msg.content)[1], c, self.limits)
            if why:
                failures[c] = why
            else:
                per_client[self.client_name(c)] = {"client_id": c, "tier": self.method.tiers[c], **metrics}
        for c, why in failures.items():
            log.warning("evaluation (round %d): client %d failed: %s", rnd, c, why)
        if not per_client:
            raise RuntimeError(f"evaluation of round {rnd}: no node returned acceptable metrics; reasons: {failures}")
        evaluation = summarise(per_client)
        evaluation["missing"] = {str(c): failures[c] for c in sorted(failures)}
        return evaluation

    def payload_bytes(self, instructions: list[Instruction], replies: list[Reply]) -> tuple[int, int]:
        dtype = self.strategy.payload_dtype
        return (sum(serde.payload_nbytes(i.state, dtype) for i in instructions),
                sum(serde.reply_payload_nbytes(r, dtype) for r in replies))

    def client_states(self) -> dict:
        return {}  # client state lives on the nodes (in their state folders); the checkpoint keeps the server's half


def is_simulation(grid: Grid) -> bool:
    """True under the Simulation Engine (its grid is in memory)."""
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # pragma: no cover - layout of other flwr versions
        return type(grid).__name__ == "InMemoryGrid"
    return isinstance(grid, InMemoryGrid)


def with_node_tiers(cfg: Config, declared: dict[int, int | None]) -> Config:
    """`cfg` with the tiers nodes declared in their node config (`tier=K`) taking precedence."""
    tiers = assign_tiers(cfg)
    resolved = [declared.get(c) or t for c, t in enumerate(tiers)]
    if resolved == tiers:
        return cfg
    log.info("tiers from the nodes' config: %s (config gave %s)", resolved, tiers)
    return serde.config_from_text(serde.config_to_text(cfg), [f"fed.tiers={resolved}", "fed.tier_proportions=[]",
                                                              "fed.tier_assignment=fixed"])  # already resolved


def serve(grid: Grid, cfg: Config, run_dir: str | Path, *, node_wait: float = 120.0) -> dict:
    """Run one fedmole job over `grid` and write its run directory; return the summary."""
    name = "flower-sim" if is_simulation(grid) else "flower"
    wave = clients_per_round(cfg)  # nodes asked at once, as a round asks them
    nodes = discover_nodes(grid, cfg.data.num_clients, node_wait, wave)
    cfg = with_node_tiers(cfg, {c: tier for c, (_, tier) in nodes.items()})
    if name == "flower-sim":
        cfg.run.engine = name
    text = serde.config_to_text(cfg)
    clients = describe_clients(grid, {c: n for c, (n, _) in nodes.items()}, text, node_wait, wave)
    strategy = FedmoleStrategy({c: n for c, (n, _) in nodes.items()}, text, cfg.run.payload_dtype,
                               cfg.fed.round_timeout, cfg.fed.client_timeout)
    log.info("%s: %d clients on nodes %s, payload %s", name, len(nodes), strategy.nodes, cfg.run.payload_dtype)
    return FlowerEngine(cfg, run_dir, grid, strategy, name, clients).run()


def make_server_app(cfg: Config, run_dir: str | Path, *, on_summary: Callable[[dict], None] | None = None,
                    node_wait: float = 120.0) -> ServerApp:
    """A ServerApp for one already loaded config (the Simulation Engine entry uses it)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        summary = serve(grid, cfg, run_dir, node_wait=node_wait)
        if on_summary is not None:
            on_summary(summary)

    return server


APP_KEYS = ("config", "overrides", "out", "node-wait")  # run-config keys of the ServerApp itself


def option_keys() -> list[str]:
    """Every fedmole option as a run-config key: [run] options bare, the others SECTION.KEY."""
    keys = [line.split(" = ", 1)[0] for line in describe()]
    return [k.removeprefix("run.") for k in keys]


def run_config_overrides(run_config: dict) -> list[str]:
    """fedmole `key=value` overrides from the fedmole keys of a Flower run config that are set (not "")."""
    known = set(option_keys())
    unknown = sorted(k for k in run_config if k not in known and k not in APP_KEYS)
    if unknown:
        raise ConfigError(f"unknown run-config key {unknown[0]!r}; allowed: {', '.join(APP_KEYS)} and the "
                          "fedmole options (`fedmole config`, [run] keys without `run.`)")
    out = []
    for key, value in run_config.items():
        if key in known and value != "":
            out.append(f"{key}={json.dumps(value) if isinstance(value, bool) else value}")
    return out


def _find_config(path: str) -> Path:
    """A config path as given, else relative to the Flower app directory (on sys.path)."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    for root in sys.path:
        if root and (Path(root) / "pyproject.toml").is_file() and (Path(root) / p).is_file():
            return Path(root) / p
    raise ConfigError(f"config {path!r} not found in {Path.cwd()} nor in the app directory")


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run .`: the fedmole job described by the run config."""
    if not log.handlers and not logging.getLogger().handlers:  # flwr-serverapp configures no logging for us
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    rc = context.run_config
    overrides = [*shlex.split(str(rc.get("overrides", ""))), *run_config_overrides(rc)]
    cfg = load_config(_find_config(str(rc["config"])), overrides)
    out = str(rc.get("out", "")) or new_run_dir(cfg.run.out_dir, cfg.run.method)
    summary = serve(grid, cfg, out, node_wait=float(rc.get("node-wait", 120.0)))
    log.info("run directory %s: %s after %d rounds, final state sha256 %s", out, summary["metrics"],
             summary["rounds"], summary["final_state_sha256"][:16])
