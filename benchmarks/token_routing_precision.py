"""Precision of token-level mixing on CUDA in bfloat16: kernel error, and model-level agreement.

Answers "does moerge's bf16 output differ from PEFT Arrow's because of the Triton kernel, or
because bf16 itself changes Arrow's top-k choices?" in two parts:

1. the Triton SGMV kernel (both outputs: float32 atomics, and serving's bf16 per-pair rows
   added in float32) and the grouped-GEMM path against a float64 reference computed from
   the same bf16 inputs, at serving sizes;
2. a 1.1B Llama-shaped model (random weights), 64 Arrow experts, batch 8 x 256: moerge's bank and
   PEFT's Arrow, each in float32 and bfloat16, and the bank under a fixed (rounding-proof)
   routing, compared on the last hidden state (per token: max abs difference over features).

Run on a CUDA machine: ``python benchmarks/token_routing_precision.py``; output is printed.
"""

import copy
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import token_routing as tr
from peft import ArrowConfig

from moerge.coordinator.inference import mixing, sgmv_triton
from moerge.coordinator.inference.lora_bank import LoraBank

dev = "cuda"
print("triton available:", sgmv_triton.available(), torch.__version__, torch.cuda.get_device_name())


def rel(a, b):
    d = (a.double() - b.double()).abs()
    top = b.abs().max()
    return (
        f"max {float(d.max()):.3e} / max|ref| {float(top):.3e} = {float(d.max() / top):.2e}; "
        f"mean {float(d.mean()):.2e}"
    )


# 1. kernel level
for N, d_in, d_out, r, E, k in [
    (16384, 2048, 2048, 16, 64, 2),
    (16384, 2048, 256, 16, 1024, 2),
    (4096, 2048, 2048, 16, 1024, 2),
    (300, 64, 48, 8, 1100, 3),
    (16384, 2048, 2048, 16, 64, 1),
]:
    g = torch.Generator(device=dev).manual_seed(0)
    A = (torch.randn(E, r, d_in, device=dev, generator=g) / d_in**0.5).bfloat16()
    Bt = (torch.randn(E, r, d_out, device=dev, generator=g) * 0.1).bfloat16()
    x = torch.randn(N, d_in, device=dev, generator=g).bfloat16()
    slots = torch.randint(0, E, (N, k), device=dev, generator=g)
    w = torch.softmax(torch.randn(N, k, device=dev, generator=g), 1).bfloat16()
    ref = torch.zeros(N, d_out, device=dev, dtype=torch.float64)
    for j in range(k):
        z = torch.einsum("nd,nrd->nr", x.double(), A[slots[:, j]].double())
        ref += w[:, j : j + 1].double() * torch.einsum("nr,nro->no", z, Bt[slots[:, j]].double())
    B = Bt.transpose(1, 2)
    tri = sgmv_triton.sgmv_token_delta(x, A, B, slots, w)
    # serving's path, added into a float32 zero output so only the kernel's own rounding shows
    tri_add = sgmv_triton.sgmv_token_add_(torch.zeros(N, d_out, device=dev), x, A, B, slots, w)
    seg = mixing._token_delta_segmented(
        x, A, B, *mixing._clean_decision(slots, w, N, torch.bfloat16)
    )
    disp = mixing.token_mixed_delta(x, A, B, slots, w)
    print(f"kernel N={N} d_in={d_in} d_out={d_out} r={r} E={E} k={k}")
    print("   triton (float32 atomics):", rel(tri, ref))
    print("   triton (bf16 pair rows)  :", rel(tri_add, ref))
    print("   segmented:", rel(seg, ref))
    print("   dispatch :", rel(disp, ref))
    del ref, tri, tri_add, seg, disp
    torch.cuda.empty_cache()

# 2. model level, llama-1b, E=64, batch 8 x 256
preset = tr.PRESETS["llama-1b"]
E, rank, top_k = 64, 16, 2
inputs = None
outs = {}
for dtype in (torch.float32, torch.bfloat16):
    base = tr.build_base("llama-1b", dev, dtype)
    shapes = tr.target_shapes(base, preset.targets)
    states = [tr.random_adapter(shapes, rank, seed=100 + i) for i in range(E)]
    config = tr.adapter_config(rank, preset.targets, __import__("pathlib").Path("/tmp/cfg"))
    parsed = [LoraBank.lora_weights_from_peft(s, config) for s in states]
    if inputs is None:
        gen = torch.Generator().manual_seed(1)
        inputs = {
            "input_ids": torch.randint(0, 32000, (8, 256), generator=gen).to(dev),
            "attention_mask": torch.ones(8, 256, dtype=torch.long, device=dev),
        }
    model = copy.deepcopy(base)
    bank = LoraBank.inject(model, preset.targets, max_rank=rank, initial_capacity=8)
    for i in range(E):
        bank.add_expert(f"e{i}", parsed[i])
    router = bank.token_router(tr.arrow_router(parsed, top_k, dev, dtype))
    table = bank.slots_of([f"e{i}" for i in range(E)])

    def fixed(module, hidden, table=table):
        n = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
        idx = (n * 5 + torch.tensor([[0, 1]], device=hidden.device) * 3 + len(module)) % E
        return table[idx], torch.tensor(
            [[0.7, 0.3]], device=hidden.device, dtype=hidden.dtype
        ).expand(hidden.shape[0], 2)

    with torch.inference_mode():
        with bank.route_tokens(router):
            outs[("bank_arrow", dtype)] = model(**inputs).last_hidden_state.float()
        with bank.route_tokens(fixed):
            outs[("bank_fixed", dtype)] = model(**inputs).last_hidden_state.float()
        if dtype == torch.bfloat16:
            avail = sgmv_triton.available
            sgmv_triton.available = lambda: False
            try:
                with bank.route_tokens(router):
                    outs[("bank_arrow_torch", dtype)] = model(**inputs).last_hidden_state.float()
                with bank.route_tokens(fixed):
                    outs[("bank_fixed_torch", dtype)] = model(**inputs).last_hidden_state.float()
            finally:
                sgmv_triton.available = avail
        outs[("base", dtype)] = model(**inputs).last_hidden_state.float()
    del model, bank
    arrow = tr.peft_arrow_in_memory(
        copy.deepcopy(base),
        states,
        rank,
        preset.targets,
        ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0),
    ).eval()
    with torch.inference_mode():
        outs[("peft_arrow", dtype)] = arrow(**inputs).last_hidden_state.float()
    del arrow, base
    torch.cuda.empty_cache()


def cmp(a, b):
    per_token = (outs[a] - outs[b]).abs().amax(-1)
    median, worst = float(per_token.median()), float(per_token.max())
    print(f"  {a} vs {b}: per-token max diff median {median:.3e} max {worst:.3e}")


f32, bf = torch.float32, torch.bfloat16
print(
    "typical |h| (fp32 base):",
    float(outs[("base", f32)].abs().mean()),
    "max",
    float(outs[("base", f32)].abs().max()),
)
for a, b in [
    (("bank_arrow", f32), ("peft_arrow", f32)),
    (("peft_arrow", bf), ("peft_arrow", f32)),
    (("bank_arrow", bf), ("bank_arrow", f32)),
    (("bank_arrow", bf), ("peft_arrow", bf)),
    (("bank_arrow_torch", bf), ("peft_arrow", bf)),
    (("bank_arrow", bf), ("bank_arrow_torch", bf)),
    (("bank_fixed", bf), ("bank_fixed", f32)),
    (("bank_fixed_torch", bf), ("bank_fixed", f32)),
    (("bank_fixed", bf), ("bank_fixed_torch", bf)),
    (("base", bf), ("base", f32)),
    (("bank_arrow", f32), ("base", f32)),
]:
    cmp(a, b)
