"""Local engine: every simulated client in one process, sharing one frozen base model.

The round loop is written out once in `LocalEngine.run`: select, configure,
train, validate, aggregate, evaluate, checkpoint. Client-side state
(optimizer moments, personal tensors) lives in each client's runtime store
and is swapped in with the client.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fedmole.algorithms.base import ClientRuntime, client_seed
from fedmole.config import Config
from fedmole.console import bars_enabled, round_line
from fedmole.engine.personal import evaluated_sha256, save_client_states
from fedmole.engine.setup import Setup, describe_setup
from fedmole.evaluation.generate import evaluate_generation
from fedmole.messages import Instruction, Reply, State, state_nbytes, state_sha256
from fedmole.reporting.rundir import RunDir
from fedmole.reporting.tracker import open_tracker

log = logging.getLogger("fedmole")


class RoundFailed(RuntimeError):
    """Too few clients replied with an acceptable update."""


def reply_nbytes(reply: Reply) -> int:
    counts = sum(c.numel() * c.element_size() for c in reply.expert_counts.values())
    return state_nbytes(reply.state) + state_nbytes(reply.extra) + counts


class LocalEngine:
    """Runs one configured federated job and writes its run directory."""

    name = "local"

    def __init__(self, cfg: Config, run_dir: str | Path):
        self.cfg = cfg
        self.out = RunDir(run_dir)
        self.setup = Setup(cfg)
        self.method = self.setup.method
        self.progress = bars_enabled(cfg.run.progress)

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
            before = self.evaluate(global_state, rnd=0)
            out.log_round({"round": 0, **_headline(before), "seconds": 0.0})
            tracker.log({"round": 0, **_headline(before)})
            log.info("before training: rouge_l %.2f, exact_match %.2f", before["rouge_l"], before["exact_match"])
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
            global_state = self.method.aggregate(rnd, accepted, global_state)   # aggregate
            evaluation = self.evaluate(global_state, rnd) if self.eval_due(rnd) else None  # evaluate

            down, up = self.payload_bytes(instructions, accepted)
            comm["up"] += up
            comm["down"] += down
            row = {
                "round": rnd,
                "train_loss": float(np.mean([r.train_loss for r in accepted])),
                **(_headline(evaluation) if evaluation else {}),
                "clients": [r.client_id for r in accepted],
                "rejected": {str(c): why for c, why in rejected.items()},
                "num_rejected": len(rejected),
                "comm_bytes_up": up,
                "comm_bytes_down": down,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            self.checkpoint(rnd, global_state, before, comm, spent + time.perf_counter() - started)  # checkpoint
            out.log_round(row)
            tracker.log(row)
            per_round = (time.perf_counter() - loop_started) / (rnd - first + 1)
            log.info(round_line(row, cfg.run.rounds, per_round * (cfg.run.rounds - rnd)))
            last_replies = accepted

        final = evaluation if evaluation is not None else self.evaluate(global_state, cfg.run.rounds)
        trained = self.method.final_state(global_state)
        out.save_adapter(trained)
        evaluated_sha = state_sha256(trained)
        if self.method.protocol == "personalized":  # what was evaluated: each client's own model
            save_client_states(out.path, self.setup, global_state, final["per_client"])
            evaluated_sha = evaluated_sha256(final["per_client"])
        summary = {
            "method": cfg.run.method,
            "engine": self.name,
            "model": cfg.model.name,
            "rounds": cfg.run.rounds,
            "seed": cfg.run.seed,
            "protocol": self.method.protocol,
            "metrics": _headline(final),
            "baseline_metrics": _headline(before),
            "per_client": final["per_client"],
            "per_tier": final["per_tier"] if self.method.tiered else {},
            "comm_bytes": comm,
            "wall_seconds": round(spent + time.perf_counter() - started, 2),
            "final_state_sha256": evaluated_sha,
            "expert_usage": self.expert_usage(last_replies),
            "autocast": str(self.setup.autocast).replace("torch.", "") if self.setup.autocast else "off",
            "data": self.setup.data_summary,
        }
        out.write_summary(summary)
        tracker.close()
        from fedmole.reporting.report import write_report

        write_report(out.path)
        return summary

    # -- checkpoints -------------------------------------------------------------
    def checkpoint(self, rnd: int, global_state: State, before: dict, comm: dict, seconds: float) -> None:
        clients = {
            rt.client_id: {"store": rt.store, "batches": rt.batches.state_dict()} for rt in self.setup.runtimes
        }
        meta = {"seed": self.cfg.run.seed, "method": self.cfg.run.method, "before": before,
                "comm": comm, "seconds": seconds}
        self.out.checkpoint(rnd, global_state, self.method.state_dict(), clients, meta)

    def restore(self) -> tuple[int, State, dict, dict, float] | None:
        """Load the newest good checkpoint into the method and clients; None if there is none."""
        ckpt = self.out.load_checkpoint()
        if ckpt is None:
            log.warning("no usable checkpoint in %s; starting from round 1", self.out.path)
            return None
        meta = ckpt["meta"]
        if meta.get("method") != self.cfg.run.method or meta.get("seed") != self.cfg.run.seed:
            raise RuntimeError(f"checkpoint {ckpt['path']} belongs to method {meta.get('method')!r} "
                               f"seed {meta.get('seed')}, not this run's config")
        self.setup.adapter.load_state_dict(ckpt["global_state"])  # also checks keys and shapes
        self.method.load_state_dict(ckpt["server"])
        for rt in self.setup.runtimes:
            saved = ckpt["clients"][rt.client_id]
            rt.store.clear()
            rt.store.update(saved["store"])
            rt.batches.load_state_dict(saved["batches"])
        rnd = int(meta["round"])
        self.out.truncate_metrics(rnd)
        log.info("resuming %s after round %d (%s)", self.out.path, rnd, ckpt["path"].name)
        return rnd + 1, ckpt["global_state"], meta["before"], dict(meta["comm"]), float(meta["seconds"])

    # -- steps -----------------------------------------------------------------
    def select(self, rnd: int, attempt: int = 0) -> list[int]:
        n = len(self.setup.runtimes)
        m = min(n, max(self.cfg.fed.min_clients, round(self.cfg.fed.sample_fraction * n)))
        if m == n:
            return list(range(n))
        rng = np.random.default_rng([self.cfg.run.seed, rnd, attempt])
        return sorted(int(c) for c in rng.choice(n, size=m, replace=False))

    def train_clients(self, rnd: int, instructions: list[Instruction]) -> tuple[list[Reply], dict[int, str]]:
        replies, failures = [], {}
        bar = tqdm(instructions, desc=f"round {rnd}/{self.cfg.run.rounds}", unit="client",
                   disable=not self.progress, leave=False)
        for instruction in bar:
            rt = self.setup.runtimes[instruction.client_id]
            torch.manual_seed(client_seed(self.cfg.run.seed, rnd, rt.client_id))
            t0 = time.perf_counter()
            try:
                reply = self.method.client_update(rt, instruction)
            except Exception as e:  # one failing client must not stop the round
                log.warning("round %d: client %d failed: %r", rnd, rt.client_id, e)
                failures[rt.client_id] = f"exception: {e!r}"
                continue
            seconds = time.perf_counter() - t0
            limit = self.cfg.fed.client_timeout
            if limit and seconds > limit:  # a straggler past the deadline: its reply arrives too late
                log.warning("round %d: client %d took %.1f s > fed.client_timeout", rnd, rt.client_id, seconds)
                failures[rt.client_id] = f"timeout: {seconds:.1f} s > fed.client_timeout = {limit} s"
                continue
            reply.metrics.setdefault("seconds", round(seconds, 3))
            log.debug("round %d: client %d (k=%d) trained, loss %.4f, %.2f s", rnd, rt.client_id, rt.tier,
                      reply.train_loss, seconds)
            bar.set_postfix(loss=f"{reply.train_loss:.3f}")
            replies.append(reply)
        return replies, failures

    def validate(self, replies: list[Reply], instructions: list[Instruction]) -> tuple[list[Reply], dict[int, str]]:
        sent = {i.client_id: i for i in instructions}
        accepted, rejected = [], {}
        for reply in replies:
            why = self.method.check(reply, sent[reply.client_id]) if reply.client_id in sent else "not selected"
            if why:
                log.warning("rejected reply of client %d: %s", reply.client_id, why)
                rejected[reply.client_id] = why
            else:
                accepted.append(reply)
        return accepted, rejected

    def payload_bytes(self, instructions: list[Instruction], replies: list[Reply]) -> tuple[int, int]:
        """Tensor payload bytes sent down and up this round (a transport that re-encodes payloads overrides it)."""
        return sum(state_nbytes(i.state) for i in instructions), sum(reply_nbytes(r) for r in replies)

    def eval_due(self, rnd: int) -> bool:
        every = self.cfg.eval.every
        return rnd == self.cfg.run.rounds or (every > 0 and rnd % every == 0)

    def evaluate(self, global_state: State, rnd: int) -> dict:
        """Generate on every client's test split with its tier's k; per client, per tier, mean."""
        per_client = {}
        bar = tqdm(self.setup.runtimes, desc=f"evaluate (round {rnd})", unit="client",
                   disable=not self.progress, leave=False)
        for rt in bar:
            per_client[rt.data.name] = evaluate_client(self.setup, rt, global_state)
        return summarise(per_client)

    def expert_usage(self, replies: list[Reply]) -> dict:
        """Each client's routing in the last round, as the method summarises it (`Method.expert_usage`)."""
        usage = {}
        for r in replies:
            summary = self.method.expert_usage(r)
            if summary is not None:
                usage[self.setup.runtimes[r.client_id].data.name] = summary
        return usage


def evaluate_client(setup: Setup, rt: ClientRuntime, global_state: State) -> dict:
    """One client's test metrics with the weights `Method.eval_view` gives it (shared by every engine)."""
    e = setup.cfg.eval
    k = setup.method.eval_view(rt, global_state)
    with setup.adapter.route(k):
        res = evaluate_generation(
            setup.model, setup.tokenizer, rt.data.test, setup.encode_prompt,
            max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, autocast_dtype=setup.autocast,
            progress=bars_enabled(setup.cfg.run.progress),
        )
    log.debug("evaluated client %d (k=%d): rouge_l %.2f over %d examples", rt.client_id, k, res["rouge_l"], res["n"])
    out = {"client_id": rt.client_id, "tier": rt.tier, "rouge_l": res["rouge_l"],
           "exact_match": res["exact_match"], "n": res["n"]}
    if setup.method.protocol == "personalized":  # which of the clients' own models was scored
        out["state_sha256"] = state_sha256(setup.method.evaluated_state(rt, global_state))
    return out


def summarise(per_client: dict) -> dict:
    tiers = defaultdict(list)
    for name, m in per_client.items():
        tiers[m["tier"]].append(m)
    per_tier = {
        str(t): {
            "rouge_l": float(np.mean([m["rouge_l"] for m in ms])),
            "exact_match": float(np.mean([m["exact_match"] for m in ms])),
            "clients": len(ms),
        }
        for t, ms in sorted(tiers.items(), reverse=True)
    }
    return {
        "rouge_l": float(np.mean([m["rouge_l"] for m in per_client.values()])),
        "exact_match": float(np.mean([m["exact_match"] for m in per_client.values()])),
        "per_client": per_client,
        "per_tier": per_tier,
    }


def _headline(evaluation: dict) -> dict:
    return {"rouge_l": evaluation["rouge_l"], "exact_match": evaluation["exact_match"]}


def run_local(cfg: Config, run_dir: str | Path) -> dict:
    return LocalEngine(cfg, run_dir).run()


__all__ = ["LocalEngine", "RoundFailed", "run_local", "ClientRuntime"]
