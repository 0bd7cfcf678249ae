"""What a lower FLAME tier saves on an MoE base: training-step time at k = top-k, ..., 1.

A random-initialised OLMoE-architecture model (64 experts, top-8, gates not
renormalised; ~250M parameters by default) gets LoRA on every expert
(`fedmole.adapters.moe_lora`); one training step (forward + backward, only
adapter tensors require grad) is timed at each tier k. Tiers are interleaved
within each repeat so machine noise hits them alike; medians are printed as
ratios to the full top-k, next to the analytic FLOPs ratio of the same step.

    .venv/bin/python benchmarks/moe_tiers.py [--precision autocast|fp32|bf16] [--threads N]
        [--hidden 768 --layers 4 --experts 64 --top-k 8 --intermediate 384 --batch 4 --seq 128]

precision: autocast = fp32 weights under bf16 autocast (what `fedmole run` does on a
bf16 CPU); fp32; bf16 = base stored in bf16, fp32 adapter master weights.
threads: one by default, since on a shared machine a second OpenMP thread that is
descheduled stalls every one of the many small per-expert matmuls (10x slower steps
were seen on a busy 2-core box); --threads 0 uses torch's default.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedmole.adapters.inject import MoLEConfig
from fedmole.adapters.moe_lora import inject_moe_lora
from fedmole.adapters.moe_models import tiny_moe


def step_flops(a: argparse.Namespace, k: int) -> dict[str, float]:
    """FLOPs of one training step per token, by part (multiply-add = 2 FLOPs).

    Frozen base matmuls cost 2x their forward (forward + input gradient); LoRA
    matmuls 3x (forward + input and weight gradients). Attention scores and
    values use the causal average of seq/2 keys.
    """
    h, i, r, e, layers = a.hidden, a.intermediate, a.rank, a.experts, a.layers
    expert = 2 * (h * 2 * i + i * h)  # gate_up + down of one expert, forward
    lora = 2 * r * (h + 2 * i) + 2 * r * (i + h)  # its two LoRA pairs, forward
    attention = 2 * 4 * h * h + 2 * 2 * (a.seq / 2) * h  # q, k, v, o projections + scores and values
    router = 2 * h * e
    head = 2 * h * a.vocab
    return {
        "experts": 2 * layers * k * expert,
        "lora": 3 * layers * k * lora,
        "attention+router": 2 * layers * (attention + router),
        "lm_head": 2 * head,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=384, help="FFN width of one expert")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--tiers", type=int, nargs="+", default=None, help="default: top-k, top-k/2, ..., 1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", choices=("autocast", "fp32", "bf16"), default="autocast")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    tiers = a.tiers or sorted({max(1, a.top_k >> s) for s in range(a.top_k.bit_length())}, reverse=True)

    model = tiny_moe("olmoe", a.vocab, seed=0, hidden=a.hidden, layers=a.layers, num_experts=a.experts,
                     top_k=a.top_k, intermediate=a.intermediate, heads=a.heads, kv_heads=a.heads)
    if a.precision == "bf16":
        model.to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    adapter = inject_moe_lora(model, MoLEConfig(rank=a.rank, alpha=2.0 * a.rank, dropout=0.0), k_max=a.top_k)
    with torch.no_grad():  # non-zero B so the LoRA path does real work
        for block in adapter.layers.values():
            block.lora_gate_up_B.normal_(0, 0.01)
            block.lora_down_B.normal_(0, 0.01)
    model.train()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    use_autocast = a.precision == "autocast"
    print(f"OLMoE-architecture model: {n_params / 1e6:.1f}M parameters ({n_expert / 1e6:.1f}M in experts), "
          f"{a.layers} layers, hidden {a.hidden}, {a.experts} experts of width {a.intermediate}, top-{a.top_k}; "
          f"LoRA rank {a.rank} on every expert: {adapter.num_parameters() / 1e6:.2f}M trainable")
    print(f"batch {a.batch}x{a.seq} tokens, precision {a.precision}, threads {torch.get_num_threads()}, "
          f"{a.repeats} repeats after {a.warmup} warm-up")

    def step(k: int) -> float:
        t = time.perf_counter()
        with adapter.route(k, collect=True), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            out = model(input_ids=ids, labels=ids)
            loss = out.loss.float() + 1e-3 * adapter.aux_loss().float()
        loss.backward()
        for p_ in adapter.parameters():
            p_.grad = None
        return time.perf_counter() - t

    for _ in range(a.warmup):
        for k in tiers:
            step(k)
    times: dict[int, list[float]] = {k: [] for k in tiers}
    for _ in range(a.repeats):
        for k in tiers:
            times[k].append(step(k))

    full = tiers[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = {k: step_flops(a, k) for k in tiers}
    total = {k: sum(f.values()) for k, f in flops.items()}
    print(f"\n{'k':>3} {'step s':>8} {'time ratio':>10} {'FLOPs ratio':>11} {'time saved':>10} "
          f"{'GFLOP/step':>10} {'experts share':>13}")
    for k in tiers:
        tokens = a.batch * a.seq
        print(f"{k:>3} {med[k]:>8.3f} {med[k] / med[full]:>10.3f} {total[k] / total[full]:>11.3f} "
              f"{1 - med[k] / med[full]:>10.1%} {total[k] * tokens / 1e9:>10.1f} "
              f"{flops[k]['experts'] / total[k]:>13.1%}")


if __name__ == "__main__":
    main()
