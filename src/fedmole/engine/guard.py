"""The trust boundary (spec 7): every client reply is decoded and checked in one place.

`admit_train` and `admit_eval` take a `decode` callable (the local engine passes the
object its client returned; Flower passes the decoding of the reply message) and run
decoding and every check inside one `try`: any exception, from a record whose bytes do
not fit its shape to a check tripping over an unexpected type, rejects that reply with
its reason, and the round goes on.

Training replies, in order: types (`validate.check_types`); identity (the server, not
the reply, decides which client and round a reply answers); the method's own checks
(`Method.check`: key sets, shapes, dtypes, finite values, expert counts in [0, tokens]
for every module); plausibility (`Limits`: example count within what the server knows,
token totals within the round's budget). Then, over the round's accepted replies,
`screen_updates` rejects or clips an update far longer than the others'.

Evaluation results: rouge_l and exact_match finite and in [0, 100], n in 1..the test
examples the server knows for that client; name, client id and tier come from the server.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from fedmole.algorithms import robust
from fedmole.algorithms.validate import check_types, is_int, is_number
from fedmole.messages import Instruction, Reply

log = logging.getLogger("fedmole")

METRIC_RANGE = (0.0, 100.0)  # ROUGE-L and exact match are percentages
SHA256 = re.compile(r"[0-9a-f]{64}")  # a personalised client's fingerprint of the model it scored


@dataclass(frozen=True)
class ClientInfo:
    """What the server knows about one client's data (the local engine's own split; on Flower,
    what the client's node declared when the run started)."""

    name: str
    train: int  # training examples
    test: int  # test examples


@dataclass
class Limits:
    """What the server knows about its clients, and the plausibility options (`[fed]`)."""

    examples: dict[int, int]  # client id -> training examples (the local split; on Flower, declared by its node)
    test_examples: dict[int, int] = field(default_factory=dict)  # client id -> test examples (same sources)
    example_ratio: float = 1.0  # fed.max_example_ratio (0 = no bound)
    max_tokens: float = float("inf")  # tokens a client can route through one module in a round
    norm_factor: float = 10.0  # fed.update_norm_factor (0 = off)
    norm_action: str = "reject"  # fed.update_norm_action

    @classmethod
    def from_config(cls, cfg, examples: dict[int, int], test_examples: dict[int, int] | None = None) -> Limits:
        t, f = cfg.train, cfg.fed
        return cls(examples=dict(examples), test_examples=dict(test_examples or {}),
                   example_ratio=f.max_example_ratio, max_tokens=float(t.local_steps * t.batch_size * cfg.data.max_len),
                   norm_factor=f.update_norm_factor, norm_action=f.update_norm_action)

    def check(self, reply: Reply) -> str | None:
        """Why a well-typed, method-checked reply is implausible, or None."""
        known = self.examples.get(reply.client_id)
        if self.example_ratio > 0 and known is not None and reply.num_examples > self.example_ratio * known:
            return (f"example count {reply.num_examples} exceeds fed.max_example_ratio = {self.example_ratio:g} "
                    f"x the {known} training examples the server knows for client {reply.client_id}")
        over = {m: t for m, t in reply.tokens.items() if t > self.max_tokens}
        if over:
            m, t = next(iter(over.items()))
            return (f"{m}: {t:.0f} tokens in one round, more than train.local_steps x train.batch_size x "
                    f"data.max_len = {self.max_tokens:.0f}")
        return None


def _reason(e: Exception) -> str:
    return f"malformed reply: {type(e).__name__}: {e}"[:500]


def admit_train(decode: Callable[[], object], instruction: Instruction, method, limits: Limits
                ) -> tuple[Reply | None, str | None]:
    """(reply, None) when the reply to `instruction` is acceptable, else (None, why)."""
    try:
        reply = decode()
        why = check_types(reply)
        if why is None:
            if reply.client_id != instruction.client_id:
                why = f"reply claims client {reply.client_id}, but answers client {instruction.client_id}"
            elif reply.round != instruction.round:
                why = f"reply for round {reply.round}, but this is round {instruction.round}"
            else:
                why = method.check(reply, instruction) or limits.check(reply)
    except Exception as e:  # noqa: BLE001 - whatever a reply makes the decoding or a check raise rejects it
        return None, _reason(e)
    return (None, why) if why else (reply, None)


def screen_updates(replies: list[Reply], instructions: dict[int, Instruction], limits: Limits,
                   reference: float | None) -> tuple[list[Reply], dict[int, str], list[float]]:
    """Reject or clip updates far longer than the round's others (`fed.update_norm_factor`).

    An update is `reply.state - instruction.state` over the keys both hold; its bound is
    factor x the median length of the *other* accepted updates this round (so a minority
    of huge updates cannot raise their own bound), or x `reference` (the previous round's
    median) when it is alone. Returns (kept replies, rejected reasons, lengths of the kept).
    """
    starts = [instructions[r.client_id].state for r in replies]
    try:
        norms = robust.update_norms([r.state for r in replies], starts)
    except Exception as e:  # noqa: BLE001 - the replies passed the checks; keep the round going regardless
        log.warning("update lengths could not be measured (%r); no length screen this round", e)
        return replies, {}, []
    if limits.norm_factor <= 0:
        return replies, {}, norms
    bounds = [limits.norm_factor * ref if ref is not None else None
              for ref in robust.leave_one_out_medians(norms, reference)]
    kept, rejected, kept_norms = [], {}, []
    for reply, start, norm, bound in zip(replies, starts, norms, bounds):
        if bound is None or bound <= 0 or norm <= bound:
            kept.append(reply)
            kept_norms.append(norm)
            continue
        why = (f"update length {norm:.4g} exceeds fed.update_norm_factor = {limits.norm_factor:g} x the median "
               f"{bound / limits.norm_factor:.4g} of the others")
        if limits.norm_action == "clip":
            log.warning("clipped the update of client %d: %s", reply.client_id, why)
            reply.state = robust.clip_update(reply.state, start, bound)
            kept.append(reply)
            kept_norms.append(bound)
        else:
            rejected[reply.client_id] = why
    return kept, rejected, kept_norms


def admit_eval(decode: Callable[[], object], client_id: int, limits: Limits) -> tuple[dict | None, str | None]:
    """(metrics, None) for an acceptable evaluation result of `client_id`, else (None, why).

    `decode` returns {"rouge_l", "exact_match", "n", ...}, "accuracy" when the client's test
    examples have options and "state_sha256" (64 hex digits) under the personalised protocol;
    only those are read, and the caller adds the client's identity and tier from its own records.
    """
    try:
        result = decode()
        if not isinstance(result, dict):
            return None, f"evaluation result is a {type(result).__name__}, not a dict"
        lo, hi = METRIC_RANGE
        for key in ("rouge_l", "exact_match"):
            value = result.get(key)
            if not is_number(value) or not lo <= value <= hi:
                return None, f"{key} = {value!r}; allowed: a finite number in [{lo:g}, {hi:g}]"
        accuracy = result.get("accuracy")
        if accuracy is not None and (not is_number(accuracy) or not lo <= accuracy <= hi):
            return None, f"accuracy = {accuracy!r}; allowed: a finite number in [{lo:g}, {hi:g}]"
        n, known = result.get("n"), limits.test_examples.get(client_id)
        if not is_int(n) or n < 1 or (known is not None and n > known):
            return None, f"n = {n!r}; allowed: an integer in 1..{known if known is not None else 'inf'}"
        out = {"rouge_l": float(result["rouge_l"]), "exact_match": float(result["exact_match"]), "n": n}
        if accuracy is not None:
            out["accuracy"] = float(accuracy)
        sha = result.get("state_sha256")
        if sha is not None:
            if not isinstance(sha, str) or not SHA256.fullmatch(sha):
                return None, f"state_sha256 = {sha!r}; allowed: 64 lowercase hex digits"
            out["state_sha256"] = sha
        return out, None
    except Exception as e:  # noqa: BLE001
        return None, _reason(e)
