#!/usr/bin/env python3
"""bf16 parity, side by side with PyTorch on the same device (GPU, or the CPU with --device cpu): last-position logits over the full
vocabulary for the fixture prompts, from (1) transformers f32, (2) transformers bf16 (the
same GGUF, dtype=torch.bfloat16, sdpa), (3) road --dtype bf16 and (4) road --dtype f32 on cuda.
Prints max |a - b| for every pair that matters: how far PyTorch's own bf16 forward is from
f32 tells what a bf16 forward can reach at all.

Usage: python parity_bf16.py --road PATH/road --model SmolLM2.gguf --ref DIR [--prompts 6] [--out CSV]
       [--device cuda|cpu]
"""
import argparse
import json
import os

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from parity import report, road_logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--road", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--out", default="parity_bf16.csv")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = ap.parse_args()
    meta = json.load(open(f"{a.ref}/public.json"))
    prompts = meta["prompts"][: a.prompts]
    mdir, mfile = os.path.dirname(a.model), os.path.basename(a.model)
    torch_logits = {}
    for name, dt in (("torch_f32", torch.float32), ("torch_bf16", torch.bfloat16)):
        m = AutoModelForCausalLM.from_pretrained(mdir, gguf_file=mfile, dtype=dt, attn_implementation="sdpa").to(a.device).eval()
        with torch.inference_mode():
            for i, p in enumerate(prompts):
                ids = torch.tensor([p["ids"]], device=a.device)
                torch_logits[(name, i)] = m(ids).logits[0, -1].float().cpu().numpy().astype(np.float64)
        del m
        if a.device == "cuda":
            torch.cuda.empty_cache()
    rows = []
    for i, p in enumerate(prompts):
        v = {k[0]: x for k, x in torch_logits.items() if k[1] == i}
        for dt in ("bf16", "f32"):
            g, ids = road_logits(a.road, a.model, p["prompt"], a.device, dt)
            assert ids == p["ids"], f"prompt {i}: road ids {ids} != {p['ids']}"
            v[f"road_{dt}"] = g
        pairs = [("torch_bf16", "torch_f32"), ("road_bf16", "torch_f32"), ("road_bf16", "torch_bf16"),
                 ("road_f32", "torch_f32")]
        for x, y in pairs:
            d = np.abs(v[x] - v[y])
            rows.append((i, x, y, float(d.max()), float(d.mean()), int(np.argmax(v[x]) == np.argmax(v[y]))))
            print(f"prompt {i}: max|{x} - {y}| {d.max():.3e}  mean {d.mean():.3e}  top1 same {rows[-1][5]}", flush=True)
    report(rows, a.out)

if __name__ == "__main__":
    main()
