"""Local engine: every simulated client in one process, sharing one frozen base model.

The round loop is written out once in `LocalEngine.run`: select, configure,
train, validate, aggregate, evaluate, checkpoint. A client's runtime is built
when it trains or is evaluated and dropped after (engine/clients.py); what it
keeps between rounds (personal tensors, optimizer moments when kept, its batch
position) lives at rest in RUN_DIR/client_state/ (engine/client_state.py).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fedmole.algorithms import robust
from fedmole.algorithms.base import ClientRuntime, client_seed, timed_update
from fedmole.config import Config
from fedmole.console import bars_enabled, round_line
from fedmole.engine.client_state import RunClientStates
from fedmole.engine.clients import ClientPool, clients_per_round
from fedmole.engine.deadline import ClientTimeout, run_client
from fedmole.engine.evaluation import (
    compute_summary,
    evaluate_client,
    evaluate_clients,
    headline,
    summarise,
    tiers_to_evaluate,
    write_predictions,
)
from fedmole.engine.guard import ClientInfo, Limits, admit_train, screen_updates
from fedmole.engine.personal import evaluated_sha256, save_client_states
from fedmole.engine.setup import Setup, describe_setup
from fedmole.messages import Instruction, Reply, State, state_nbytes, state_sha256
from fedmole.reporting.report import read_metrics
from fedmole.reporting.rundir import RunDir
from fedmole.reporting.tracker import open_tracker

log = logging.getLogger("fedmole")


class RoundFailed(RuntimeError):
    """Too few clients replied with an acceptable update."""


class ResumeError(RuntimeError):
    """A run directory cannot be continued (the message says why)."""


def reply_nbytes(reply: Reply) -> int:
    counts = sum(c.numel() * c.element_size() for c in reply.expert_counts.values())
    return state_nbytes(reply.state) + state_nbytes(reply.extra) + counts


class LocalEngine:
    """Runs one configured federated job and writes its run directory."""

    name = "local"

    def __init__(self, cfg: Config, run_dir: str | Path):
        self.cfg = cfg
        self.out = RunDir(run_dir)
        self.setup = self.make_setup(cfg)
        self.method = self.setup.method
        self.states = RunClientStates(self.out.path)
        self.pool = ClientPool(self.setup, self.states)
        self.progress = bars_enabled(cfg.run.progress)
        self.clients = self.client_infos()  # client id -> name, training and test example counts
        self.limits = Limits.from_config(
            cfg, self.method.known_examples({c: info.train for c, info in self.clients.items()}),
            {c: info.test for c, info in self.clients.items()})
        self.norm_reference: float | None = None  # median update length of the last round (engine/guard.py)
        self.client_seconds: dict[int, float] = {}  # wall seconds of each client's last update

    # -- the round loop --------------------------------------------------------
    def run(self, resume: bool = False) -> dict:
        """Run every round (or, with `resume`, continue after the last good checkpoint)."""
        cfg, out = self.cfg, self.out
        started = time.perf_counter()
        for line in describe_setup(self.setup, self.name, out.path):
            log.info(line)
        tracker = open_tracker(cfg.run.tracker, out.path, cfg.to_dict())
        restored = self.restore() if resume else None
        if restored:
            first, global_state, before, comm, spent = restored
        else:
            out.write_config(cfg.to_dict())
            global_state = self.method.initial_state(self.setup.adapter)
            before = None
            self.rows = []
            if cfg.eval.before:  # its means only: every checkpoint carries them (per client: the population)
                before = headline(self.evaluate(global_state, rnd=0))
                self.rows.append({"round": 0, **before, "seconds": 0.0})
                tracker.log({"round": 0, **before})
                log.info("before training: %s", ", ".join(f"{k} {v:.2f}" for k, v in before.items()))
            out.write_metrics(self.rows)  # starting over replaces what an earlier attempt wrote
            first, comm, spent = 1, {"up": 0, "down": 0}, 0.0
        loop_started = time.perf_counter()
        last_replies: list[Reply] = []
        evaluation = None

        for rnd in range(first, cfg.run.rounds + 1):
            t0 = time.perf_counter()
            for attempt in range(cfg.fed.round_retries + 1):
                selected = self.select(rnd, attempt)                                 # select
                instructions = self.method.configure(rnd, selected, global_state)    # configure
                replies, failures = self.train_clients(rnd, instructions)            # train
                accepted, rejected = self.validate(replies, instructions)            # validate
                rejected.update(failures)
                if len(accepted) >= cfg.fed.min_clients:
                    break
                log.warning("round %d attempt %d: %d acceptable replies < fed.min_clients = %d",
                            rnd, attempt + 1, len(accepted), cfg.fed.min_clients)
            else:
                raise RoundFailed(
                    f"round {rnd}: {len(accepted)} acceptable replies, fed.min_clients = {cfg.fed.min_clients}, "
                    f"after {cfg.fed.round_retries + 1} attempt(s); rejected: {rejected}"
                )
            global_state = self.aggregate(rnd, accepted, instructions, global_state)   # aggregate
            evaluation = self.evaluate(global_state, rnd) if self.eval_due(rnd) else None  # evaluate

            down, up = self.payload_bytes(instructions, accepted)
            comm["up"] += up
            comm["down"] += down
            row = {
                "round": rnd,
                "train_loss": float(np.mean([r.train_loss for r in accepted])),
                **(headline(evaluation) if evaluation else {}),
                **({"eval_missing": evaluation["missing"]} if evaluation and evaluation.get("missing") else {}),
                "clients": [r.client_id for r in accepted],
                "rejected": {str(c): why for c, why in rejected.items()},
                "num_rejected": len(rejected),
                "comm_bytes_up": up,
                "comm_bytes_down": down,
                "seconds": round(time.perf_counter() - t0, 3),
                "compute": [{"client": r.client_id, "tier": r.tier, "step_seconds": r.metrics["step_seconds"],
                             "steps": r.metrics["steps"]} for r in accepted if "step_seconds" in r.metrics],
                **self.method.round_metrics(),
            }
            self.rows.append(row)
            self.checkpoint(rnd, global_state, before, comm, spent + time.perf_counter() - started)  # checkpoint
            out.log_round(row)  # after the checkpoint, which holds the row too
            tracker.log(row)
            per_round = (time.perf_counter() - loop_started) / (rnd - first + 1)
            log.info(round_line(row, cfg.run.rounds, per_round * (cfg.run.rounds - rnd)))
            last_replies = accepted

        final = evaluation if evaluation is not None else self.evaluate(global_state, cfg.run.rounds)
        records = final.pop("records", None)
        if records:  # engines whose clients score remotely return no per-example records
            write_predictions(out.path, records)
        trained = self.method.final_state(global_state)
        out.save_adapter(trained)
        evaluated_sha = state_sha256(trained)
        if self.method.protocol == "personalized":  # what was evaluated: each client's own model
            opened = (self.pool.open(c, train=False) for c in sorted(self.setup.client_data))
            save_client_states(out.path, self.method, opened, trained, final["per_client"])
            evaluated_sha = evaluated_sha256(final["per_client"])
        summary = {
            "method": cfg.run.method,
            "engine": self.name,
            "model": cfg.model.name,
            "rounds": cfg.run.rounds,
            "seed": cfg.run.seed,
            "protocol": self.method.protocol,
            "metrics": headline(final),
            "baseline_metrics": headline(before) if before else None,
            "per_client": final["per_client"],
            "per_tier": final["per_tier"] if self.method.tiered else {},
            "evaluation_missing": final.get("missing", {}),  # clients the final evaluation lacks, and why
            "compute": compute_summary(read_metrics(out.metrics_path), self.tier_flops()),
            "comm_bytes": comm,
            "wall_seconds": round(spent + time.perf_counter() - started, 2),
            "final_state_sha256": evaluated_sha,
            "expert_usage": self.expert_usage(last_replies),
            "autocast": str(self.setup.autocast).replace("torch.", "") if self.setup.autocast else "off",
            "threads": torch.get_num_threads(),
            "data": self.setup.data_summary,
        }
        out.write_summary(summary)
        tracker.close()
        from fedmole.reporting.report import write_report

        write_report(out.path)
        return summary

    # -- checkpoints -------------------------------------------------------------
    def checkpoint(self, rnd: int, global_state: State, before: dict, comm: dict, seconds: float) -> None:
        """Save round `rnd`: global and server state, which client state files are current, and every
        metric row so far; then delete the client state no kept checkpoint names."""
        meta = {"seed": self.cfg.run.seed, "method": self.cfg.run.method, "engine": self.name, "before": before,
                "comm": comm, "seconds": seconds, "rows": self.rows, "norm_reference": self.norm_reference}
        self.out.checkpoint(rnd, global_state, self.method.state_dict(), self.client_states(), meta)
        self.states.prune(self.out.checkpoint_rounds()[0])

    def client_states(self) -> dict:
        """Which version of each client's state (at rest in RUN_DIR/client_state/) this round ends with."""
        return self.states.manifest()

    def restore(self) -> tuple[int, State, dict, dict, float] | None:
        """Load the newest good checkpoint into the method and clients; None if there is none."""
        ckpt = self.out.load_checkpoint()
        if ckpt is None:
            log.warning("no usable checkpoint in %s; starting from round 1", self.out.path)
            return None
        meta = ckpt["meta"]
        check_resumable(self.out.path, meta)
        if meta.get("method") != self.cfg.run.method or meta.get("seed") != self.cfg.run.seed:
            raise ResumeError(f"checkpoint {ckpt['path']} belongs to method {meta.get('method')!r} "
                              f"seed {meta.get('seed')}, not this run's config")
        if "rows" not in meta or ckpt["clients"] is None:
            raise ResumeError(f"checkpoint {ckpt['path']} holds no metric rows or keeps its clients' state inside "
                              "it (written by an older fedmole); start a new run")
        self.setup.adapter.load_state_dict(ckpt["global_state"])  # also checks keys and shapes
        self.method.load_state_dict(ckpt["server"])
        rnd = int(meta["round"])
        self.states.restore(ckpt["clients"], rnd)
        self.rows = list(meta["rows"])
        self.out.write_metrics(self.rows)
        self.norm_reference = meta.get("norm_reference")
        log.info("resuming %s after round %d (%s)", self.out.path, rnd, ckpt["path"].name)
        return rnd + 1, ckpt["global_state"], meta["before"], dict(meta["comm"]), float(meta["seconds"])

    # -- steps -----------------------------------------------------------------
    def per_round(self) -> int:
        """Clients selected per round: fed.sample_fraction of data.num_clients, at least fed.min_clients."""
        return clients_per_round(self.cfg)

    def select(self, rnd: int, attempt: int = 0) -> list[int]:
        n, m = self.cfg.data.num_clients, self.per_round()
        if m == n:
            return list(range(n))
        rng = np.random.default_rng([self.cfg.run.seed, rnd, attempt])
        return sorted(int(c) for c in rng.choice(n, size=m, replace=False))

    def train_clients(self, rnd: int, instructions: list[Instruction]) -> tuple[dict[int, object], dict[int, str]]:
        """What each client returned (client id -> undecoded reply, in instruction order) and why
        the others returned nothing."""
        replies, failures = {}, {}
        bar = tqdm(instructions, desc=f"round {rnd}/{self.cfg.run.rounds}", unit="client",
                   disable=not self.progress, leave=False)
        for instruction in bar:
            rt = self.pool.open(instruction.client_id)  # built now, dropped after this client's turn
            torch.manual_seed(client_seed(self.cfg.run.seed, rnd, rt.client_id))
            t0 = time.perf_counter()
            try:  # held by the wall clock: a client past fed.client_timeout is abandoned (engine/deadline.py)
                reply = run_client(self.setup, rt, partial(timed_update, self.method), instruction,
                                   self.cfg.fed.client_timeout)
            except ClientTimeout as e:
                log.warning("round %d: client %d dropped: %s", rnd, rt.client_id, e)
                failures[rt.client_id] = str(e)
                continue
            except Exception as e:  # one failing client must not stop the round
                log.warning("round %d: client %d failed: %r", rnd, rt.client_id, e)
                failures[rt.client_id] = f"exception: {e!r}"
                continue
            self.client_seconds[rt.client_id] = round(time.perf_counter() - t0, 3)
            self.pool.keep(rt, rnd)
            log.debug("round %d: client %d (k=%d) trained in %.2f s", rnd, rt.client_id, rt.tier,
                      self.client_seconds[rt.client_id])
            replies[rt.client_id] = reply
        return replies, failures

    def decode(self, raw: object) -> Reply:
        """The Reply inside what a client returned (in-process clients return the Reply itself)."""
        return raw  # type: ignore[return-value]

    def validate(self, raw: dict[int, object], instructions: list[Instruction]) -> tuple[list[Reply], dict[int, str]]:
        """The acceptable replies (instruction order) and why the others were rejected (engine/guard.py)."""
        sent = {i.client_id: i for i in instructions}
        accepted, rejected = [], {}
        for c, item in raw.items():
            reply, why = admit_train(lambda: self.decode(item), sent[c], self.method, self.limits)
            if why:
                rejected[c] = why
            else:
                accepted.append(reply)
        accepted, screened, norms = screen_updates(accepted, sent, self.limits, self.norm_reference)
        rejected.update(screened)
        if norms:
            self.norm_reference = float(np.median(norms))
        for c, why in rejected.items():
            log.warning("rejected reply of client %d: %s", c, why)
        for reply in accepted:
            if reply.client_id in self.client_seconds:
                reply.metrics.setdefault("seconds", self.client_seconds[reply.client_id])
        return accepted, rejected

    def aggregate(self, rnd: int, accepted: list[Reply], instructions: list[Instruction], previous: State) -> State:
        """The method's aggregation, after `fed.robust = "clip"` has clipped every update to the median length."""
        if self.cfg.fed.robust == "clip":
            sent = {i.client_id: i for i in instructions}
            clipped = robust.clip_to_median([r.state for r in accepted], [sent[r.client_id].state for r in accepted])
            for reply, state in zip(accepted, clipped):
                reply.state = state
        return self.method.aggregate(rnd, accepted, previous)

    def payload_bytes(self, instructions: list[Instruction], replies: list[Reply]) -> tuple[int, int]:
        """Tensor payload bytes sent down and up this round (a transport that re-encodes payloads overrides it)."""
        return sum(state_nbytes(i.state) for i in instructions), sum(reply_nbytes(r) for r in replies)

    def eval_due(self, rnd: int) -> bool:
        every = self.cfg.eval.every
        return rnd == self.cfg.run.rounds or (every > 0 and rnd % every == 0)

    def evaluate(self, global_state: State, rnd: int) -> dict:
        """Score every client's eval split at its tier's k (every tier's, with eval.tiers = all);
        per client, per tier, mean, and the per-example `records`. Clients are opened as they are
        scored; under the global protocol many clients' examples are scored in one batch
        (`evaluate_clients`)."""
        per_client, records = {}, []
        tiers = tiers_to_evaluate(self.setup)
        state = self.method.final_state(global_state)  # the whole trained model (FLoRA: with its merged base)
        bar = tqdm(total=len(self.setup.client_data), desc=f"evaluate (round {rnd})", unit="client",
                   disable=not self.progress, leave=False)
        # the global model's view needs no client's kept state: loading it for a whole batch of
        # clients would hold their stores (optimizer moments, when kept) in memory at once
        open_client = self.pool.open if self.method.protocol == "personalized" else self.setup.runtime
        opened = (open_client(c, train=False) for c in sorted(self.setup.client_data))
        for result in evaluate_clients(self.setup, opened, state, tiers):
            records += result.pop("records")
            per_client[self.setup.client_data[result["client_id"]].name] = result
            bar.update()
        bar.close()
        return {**summarise(per_client), "records": records}

    def tier_flops(self) -> dict[str, float]:
        """Estimated training FLOPs per token at every tier in use, for sequences of data.max_len tokens."""
        from fedmole.compute import tier_flops

        try:
            return tier_flops(self.setup.model, self.setup.adapter, self.setup.tiers, self.cfg.data.max_len)
        except TypeError as e:  # an adapter kind without a FLOPs rule: say so, report time only
            log.warning("no FLOPs estimate: %s", e)
            return {}

    def make_setup(self, cfg: Config) -> Setup:
        return Setup(cfg)

    def client_infos(self) -> dict[int, ClientInfo]:
        """What the server knows about each client's data (here: the clients themselves)."""
        return {c.client_id: ClientInfo(c.name, len(c.train), len(c.test)) for c in self.setup.clients}

    def client_name(self, client_id: int) -> str:
        return self.clients[client_id].name

    def expert_usage(self, replies: list[Reply]) -> dict:
        """Each client's routing in the last round, as the method summarises it (`Method.expert_usage`)."""
        usage = {}
        for r in replies:
            summary = self.method.expert_usage(r)
            if summary is not None:
                usage[self.client_name(r.client_id)] = summary
        return usage


def check_resumable(run_dir: str | Path, meta: dict | None = None) -> None:
    """Raise ResumeError when the run in `run_dir` (its newest checkpoint, or `meta`) ran on Flower."""
    engine = (RunDir(run_dir).newest_meta() if meta is None else meta).get("engine", "local")
    if engine != "local":
        raise ResumeError(
            f"{run_dir} was run on the {engine} engine: its clients' state and batch positions lived on the "
            "Flower nodes, not versioned with the checkpoints, which hold only the server's half (global "
            "adapter, method state, metric rows); start a new run")


def run_local(cfg: Config, run_dir: str | Path) -> dict:
    return LocalEngine(cfg, run_dir).run()


__all__ = ["LocalEngine", "RoundFailed", "ResumeError", "check_resumable", "run_local", "ClientRuntime",
           "evaluate_client", "summarise"]
