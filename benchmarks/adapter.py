"""Forward+backward cost of the MoLE adapter against its references, measured in one run.

1. One adapted layer on SmolLM2-135M shapes (q_proj 576->576, v_proj 576->192),
   frozen base linear + adapter, a realistic batch of tokens:
     - MoLE, stacked (E=8, k=2, r=8)            -- fedmole's hot path
     - MoLE, naive per-expert loop (same maths) -- the test oracle
     - PEFT LoRA, rank 16 (the same active rank: k*r = 16)
2. A whole training step of SmolLM2-135M (adapters on q_proj and v_proj) with
   each of the three.

Prints medians over repeats and the ratios against PEFT LoRA in the same run.

    .venv/bin/python benchmarks/adapter.py [--repeats 7] [--tokens 2048] [--dtype bf16|fp32] [--skip-model]
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch
from torch import nn

from fedmole.adapters.inject import MoLEConfig, inject_mole
from fedmole.adapters.mole import MoLELinear, Routing, reference_forward


def interleaved_medians(steps: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per variant; variants take turns within each repeat so that
    load changes on a shared machine hit them alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def autocast(dtype):
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


def peft_lora(module: nn.Module, targets: list[str], rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(module, cfg)


def naive(layer: MoLELinear) -> MoLELinear:
    layer.forward = types.MethodType(reference_forward, layer)
    return layer


def layer_bench(d_in: int, d_out: int, tokens: int, repeats: int, dtype) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(tokens // 256, 256, d_in)

    def fresh_base():
        base = nn.Linear(d_in, d_out, bias=False)
        base.requires_grad_(False)
        return base

    def make_mole():
        layer = MoLELinear(fresh_base(), Routing(k=2), num_experts=8, rank=8, alpha=16, k_max=8)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.01)
        return layer

    holder = nn.Module()
    holder.proj = fresh_base()
    variants = {
        "mole_stacked": make_mole(),
        "mole_naive_loop": naive(make_mole()),
        "peft_lora_r16": peft_lora(holder, ["proj"], 16).base_model.model.proj,
    }
    def make_step(layer):
        params = [p for p in layer.parameters() if p.requires_grad]

        def step():
            with autocast(dtype):
                y = layer(x)
            y.float().square().mean().backward()
            for p in params:
                p.grad = None

        return step

    return interleaved_medians({name: make_step(layer) for name, layer in variants.items()}, repeats)


def model_bench(repeats: int, dtype, batch: int, seq: int) -> dict[str, float]:
    from fedmole.models import load_base

    ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(0))

    def make_step(name):
        model, _ = load_base("smollm2-135m-instruct")
        if name == "peft_lora_r16":
            model = peft_lora(model, ["q_proj", "v_proj"], 16)
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            adapter = inject_mole(model, MoLEConfig(num_experts=8, rank=8, dropout=0.0), k_max=8)
            adapter.routing.k = 2
            if name == "mole_naive_loop":
                for layer in adapter.layers.values():
                    naive(layer)
            params = adapter.parameters()
        model.train()

        def step():
            with autocast(dtype):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            for p in params:
                p.grad = None

        return step

    names = ("mole_stacked", "mole_naive_loop", "peft_lora_r16")
    return interleaved_medians({name: make_step(name) for name in names}, repeats, warmup=1)


def report(title: str, times: dict[str, float]) -> None:
    ref = times["peft_lora_r16"]
    print(f"\n{title}")
    print(f"{'variant':18s} {'median ms':>10s} {'vs PEFT LoRA r16':>17s}")
    for name, t in times.items():
        print(f"{name:18s} {t * 1e3:10.2f} {t / ref:16.2f}x")
    print(f"stacked vs naive loop: {times['mole_stacked'] / times['mole_naive_loop']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per layer call (multiple of 256)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--skip-model", action="store_true", help="only the layer benchmark")
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, autocast {args.dtype}")
    for d_in, d_out, name in ((576, 576, "q_proj"), (576, 192, "v_proj")):
        times = layer_bench(d_in, d_out, args.tokens, args.repeats, dtype)
        report(f"layer {name} {d_in}->{d_out}, {args.tokens} tokens, forward+backward", times)
    if not args.skip_model:
        times = model_bench(max(3, args.repeats // 2), dtype, args.batch, args.seq)
        report(f"SmolLM2-135M training step, batch {args.batch}x{args.seq}, adapters on q_proj+v_proj", times)


if __name__ == "__main__":
    main()
