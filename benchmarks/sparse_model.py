"""Which sparse SmolLM2 to train FLAME on: held-out loss and training-step time at every tier,
for every construction tried, against the dense model measured in the same run.

Candidates (fedmole.sparsify):
  upcycle-8x4   8 copies of each MLP, top-4, k-means router (the embedded `smollm2-moe`)
  upcycle-4x4   4 copies, top-4
  split-8x8     the 1,536 neurons split into 8 co-activation clusters of 192, top-8, a router fitted
                by least squares to each expert's output norm

For each: the mean token loss on held-out Natural Instructions text at its native top-k and at every
tier of --tiers (with FLAME's rescaler at its start value top_k/k, and unscaled), and the time of one
FLAME training step (LoRA of rank 8 on every expert, dropout 0.05, forward + backward, batch
--batch x --seq tokens) at those tiers: medians over --repeats different batches, interleaved
across tiers, after a warm-up step per tier. The dense reference step is SmolLM2 with the dense
main job's adapter (MoLE on q_proj and v_proj, 8 experts of rank 8, k = 8), timed the same way.
Then the acceptance checks:
  loss at the native top-k within 2% of dense; every tier in --tiers at most 1.3x dense;
  the lowest tier's step at most 0.5x the top tier's; the top tier's step at most 3.5x dense.

    .venv/bin/python benchmarks/sparse_model.py [--candidates upcycle-8x4,split-8x8] [--tiers 4,2,1]
        [--repeats 5] [--batch 8 --seq 128] [--autocast auto|bf16|off] [--threads 0]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from fedmole.adapters.inject import MoLEConfig, inject_mole
from fedmole.adapters.moe_lora import inject_moe_lora
from fedmole.assets import prepare_natural_instructions, prepare_smollm2
from fedmole.engine.setup import pick_autocast
from fedmole.sparsify import (
    CALIBRATION,
    HELD_OUT,
    SparsifySpec,
    lm_loss,
    ni_sample,
    sparsify,
    tier_losses,
    token_batches,
)
from fedmole.training import answer_loss, autocast_context

CANDIDATES = {
    "upcycle-8x4": SparsifySpec("upcycle", num_experts=8, top_k=4, router_spread=0.1),
    "upcycle-4x4": SparsifySpec("upcycle", num_experts=4, top_k=4, router_spread=0.1),
    "split-8x8": SparsifySpec("split", num_experts=8, top_k=8),
}


def train_batches(tokenizer, count: int, batch: int, seq: int) -> list[dict[str, torch.Tensor]]:
    """`count` different (batch, seq) batches of NI prompts + answers, answer tokens labelled.

    Different batches route differently, so every timed step meets expert row counts of its own,
    as training does (a repeated batch would replay one set of matmul shapes).
    """
    examples = ni_sample(prepare_natural_instructions(), (80, 120), 1, seed=2)
    if len(examples) < count * batch:
        raise SystemExit(f"{count} batches of {batch} need {count * batch} examples; the sample has {len(examples)}")
    return [train_batch(tokenizer, examples[i * batch : (i + 1) * batch], seq) for i in range(count)]


def train_batch(tokenizer, examples, seq: int) -> dict[str, torch.Tensor]:
    """One (len(examples), seq) batch, padded to seq."""
    from fedmole.data.tokenize import collate_train, encode_train

    items = [encode_train(tokenizer, ex, max_len=seq, max_answer_tokens=32) for ex in examples]
    out = collate_train(items, tokenizer.pad_token_id)
    pad = seq - out["input_ids"].shape[1]  # equal-length batches: every repeat times the same work
    if pad > 0:
        out["input_ids"] = torch.nn.functional.pad(out["input_ids"], (0, pad), value=tokenizer.pad_token_id)
        out["attention_mask"] = torch.nn.functional.pad(out["attention_mask"], (0, pad))
        out["labels"] = torch.nn.functional.pad(out["labels"], (0, pad), value=-100)
    return out


def step_time(model, adapter, batch, k: int, autocast) -> float:
    """Seconds of one forward + backward of the answer loss with k active experts."""
    params = adapter.parameters()
    model.train()
    t0 = time.perf_counter()
    with adapter.route(k, token_mask=batch["attention_mask"]):
        with autocast_context(torch.device("cpu"), autocast):
            loss = answer_loss(model, batch)
        loss.float().backward()
    seconds = time.perf_counter() - t0
    for p in params:
        p.grad = None
    model.eval()
    return seconds


def time_tiers(model, adapter, batches, tiers: list[int], autocast) -> dict[int, float]:
    """Median step seconds per tier: a warm-up step per tier on batches[0], then one step per tier
    on each further batch (interleaved, so that machine noise hits every tier alike)."""
    for k in tiers:  # warm-up (weight casts, allocator, compiled matmul kernels)
        step_time(model, adapter, batches[0], k, autocast)
    samples = {k: [] for k in tiers}
    for batch in batches[1:]:
        for k in tiers:
            samples[k].append(step_time(model, adapter, batch, k, autocast))
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--tiers", default="4,2,1", help="the main job's tiers (the 1.3x loss check applies to them)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--autocast", default="auto", choices=("auto", "bf16", "off"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    names = [n.strip() for n in a.candidates.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        p.error(f"unknown candidate(s) {unknown}; known: {', '.join(CANDIDATES)}")
    main_tiers = [int(t) for t in a.tiers.split(",")]
    autocast = pick_autocast(a.autocast, torch.device("cpu"))
    precision = "bf16 autocast" if autocast is not None else "fp32"
    print(f"precision: {precision} (run.autocast={a.autocast}), threads: {torch.get_num_threads()}, "
          f"batch {a.batch} x {a.seq} tokens, {a.repeats} repeats (medians)")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense_dir = prepare_smollm2()
    ni = prepare_natural_instructions()
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    c, h = CALIBRATION, HELD_OUT
    calibration = token_batches(tokenizer, ni_sample(ni, c["lines"], c["per_task"], c["seed"]), c["max_len"])
    held = token_batches(tokenizer, ni_sample(ni, h["lines"], h["per_task"], h["seed"], h["limit"]), h["max_len"])
    batches = train_batches(tokenizer, a.repeats + 1, a.batch, a.seq)

    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    dense_loss = lm_loss(dense, held, autocast)
    probe = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    mole = inject_mole(probe, MoLEConfig(num_experts=8, rank=8, targets=["q_proj", "v_proj"]), k_max=8)
    dense_step = time_tiers(probe, mole, batches, [8], autocast)[8]
    del probe, mole
    print(f"dense SmolLM2-135M-Instruct: held-out loss {dense_loss:.4f}; training step {dense_step:.3f} s "
          f"(MoLE on q_proj, v_proj, k=8)\n")

    for name in names:
        spec = CANDIDATES[name]
        t0 = time.perf_counter()
        model, _ = sparsify(dense, calibration, spec, autocast)
        built = time.perf_counter() - t0
        # the native top-k and the main job's tiers (every k of an 8-of-8 split would double the cost)
        tiers = sorted({spec.top_k, *(k for k in main_tiers if k <= spec.top_k)}, reverse=True)
        # FLAME's adapter as a run starts it: LoRA B = 0 and the rescaler at top_k / k
        adapter = inject_moe_lora(model, MoLEConfig(rank=8, dropout=0.05, rescale="learned"), k_max=spec.top_k)
        losses = tier_losses(model, held, tiers, autocast, adapter=adapter)
        times = time_tiers(model, adapter, batches, tiers, autocast)
        del model, adapter
        gc.collect()

        print(f"== {name}: {spec.construction}, {spec.num_experts} experts, native top-{spec.top_k} "
              f"(built in {built:.0f} s)")
        print("| tier k | loss, rescaled | vs dense | loss, unscaled | vs dense | step s | vs top tier | vs dense |")
        print("|---|---|---|---|---|---|---|---|")
        for k in tiers:
            lr, lu = losses[k]["rescaled"], losses[k]["unscaled"]
            print(f"| {k} | {lr:.4f} | {lr / dense_loss:.3f}x | {lu:.4f} | {lu / dense_loss:.3f}x | "
                  f"{times[k]:.3f} | {times[k] / times[spec.top_k]:.2f}x | {times[k] / dense_step:.2f}x |")
        usable = [k for k in main_tiers if k in losses]
        best = {k: min(losses[k]["rescaled"], losses[k]["unscaled"]) for k in usable}
        checks = [
            (f"native top-{spec.top_k} loss within 2% of dense", losses[spec.top_k]["rescaled"] / dense_loss,
             "<= 1.02", losses[spec.top_k]["rescaled"] <= 1.02 * dense_loss),
            (f"worst tier of {usable} at most 1.3x dense (better of rescaled/unscaled)",
             max(best.values()) / dense_loss, "<= 1.30", max(best.values()) <= 1.3 * dense_loss),
            (f"tier {min(usable)} step vs tier {spec.top_k}", times[min(usable)] / times[spec.top_k], "<= 0.50",
             times[min(usable)] <= 0.5 * times[spec.top_k]),
            (f"tier {spec.top_k} step vs dense", times[spec.top_k] / dense_step, "<= 3.50",
             times[spec.top_k] <= 3.5 * dense_step),
        ]
        for what, value, bound, ok in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {what}: {value:.3f} ({bound})")
        print()


if __name__ == "__main__":
    main()
