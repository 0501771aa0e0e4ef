#!/usr/bin/env python3
"""Attribution patching with plain torch autograd (hooks + one backward), on a road AtP run's own
pairs: an independent check of `road run` with `intervention.kind = "atp"` and the torch side of
`road bench atp`.

Reads RUN_DIR/pairs.jsonl (test split) and RUN_DIR/metrics.csv, recomputes every cell's estimate
`mean_pairs (s − b) · ∂LD/∂a` for the sites block_output (decoder layer output), attn_output
(o_proj output), mlp_output (mlp output) and head_output (o_proj input, whole and per head) with
forward hooks and `retain_grad` (the graph starts at `inputs_embeds`), plain (gradient at the
base) or IG (gradients averaged at `emb_b + α (emb_s − emb_b)`, α = (j + ½)/steps), and prints
the largest difference from road's `effect_estimate`, their correlation, and seconds.

Usage:
  /tmp/torchbench/venv/bin/python bench/reference/atp_torch.py RUN_DIR [--method plain|ig] [--steps 5]
"""
import argparse
import csv
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = "/root/.cache/road-dii/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
SITES = ("block_output", "attn_output", "mlp_output", "head_output")


def hooks(model, store, grad):
    """Forward hooks filling store[(layer, site)] (retaining the gradient when `grad`)."""
    hs = []
    def keep(key, t):
        if grad:
            t.retain_grad()
        store[key] = t
    for l, layer in enumerate(model.model.layers):
        hs.append(layer.register_forward_hook(lambda m, i, o, l=l: keep((l, "block_output"), o[0] if isinstance(o, tuple) else o)))
        hs.append(layer.self_attn.o_proj.register_forward_hook(lambda m, i, o, l=l: keep((l, "attn_output"), o)))
        hs.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, i, l=l: keep((l, "head_output"), i[0])))
        hs.append(layer.mlp.register_forward_hook(lambda m, i, o, l=l: keep((l, "mlp_output"), o)))
    return hs


def main():
    import numpy as np
    import torch
    from bench_torch import load_gguf
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--method", default="plain", choices=["plain", "ig"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, _ = load_gguf(a.model, torch.float32, "eager")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pairs = [json.loads(l) for l in open(os.path.join(a.run_dir, "pairs.jsonl")) if l.strip()]
    pairs = sorted([p for p in pairs if p["split"] == "test"], key=lambda p: p["index"])
    if len({len(p["base"]["ids"]) for p in pairs} | {len(p["source"]["ids"]) for p in pairs}) != 1:
        raise SystemExit("this check needs prompts of one length (one template)")
    hd = model.config.head_dim if getattr(model.config, "head_dim", None) else model.config.hidden_size // model.config.num_attention_heads
    emb = model.get_input_embeddings()
    t0, c0 = time.perf_counter(), time.process_time()
    est = {}
    for start in range(0, len(pairs), 16):
        batch = pairs[start:start + 16]
        ib = torch.tensor([p["base"]["ids"] for p in batch])
        isrc = torch.tensor([p["source"]["ids"] for p in batch])
        cf = torch.tensor([p["cf_label"] for p in batch])
        bl = torch.tensor([p["base"]["label"] for p in batch])
        src, base = {}, {}
        with torch.no_grad():
            hs = hooks(model, src, False)
            model(input_ids=isrc, logits_to_keep=1)
            for h in hs:
                h.remove()
        eb, es = emb(ib), emb(isrc)
        alphas = [0.0] if a.method == "plain" else [(j + 0.5) / a.steps for j in range(a.steps)]
        grads = {}
        for al in alphas:
            store = {}
            hs = hooks(model, store, True)
            x = (eb + al * (es - eb)).detach().requires_grad_(True)
            # Only the last position's logits, as road computes them.
            logits = model(inputs_embeds=x, logits_to_keep=1).logits[:, -1, :]
            ld = (logits.gather(1, cf[:, None]) - logits.gather(1, bl[:, None])).sum()
            ld.backward()
            for h in hs:
                h.remove()
            for k, t in store.items():
                grads[k] = grads.get(k, 0) + t.grad / len(alphas)
                if al == alphas[0]:
                    base[k] = t.detach()
        if a.method == "ig":
            with torch.no_grad():
                hs = hooks(model, base, False)
                model(input_ids=ib, logits_to_keep=1)
                for h in hs:
                    h.remove()
        for (l, site), g in grads.items():
            # Same lengths: a pair's base and source positions coincide.
            c = (src[(l, site)] - base[(l, site)]) * g
            whole = (c.sum(-1).sum(0) / len(pairs)).tolist()
            per_head = (c.reshape(c.shape[0], c.shape[1], -1, hd).sum(-1).sum(0) / len(pairs)).tolist()
            for pos in range(c.shape[1]):
                est[(l, site, str(pos), "")] = est.get((l, site, str(pos), ""), 0.0) + whole[pos]
                if site == "head_output":
                    for h, v in enumerate(per_head[pos]):
                        est[(l, site, str(pos), str(h))] = est.get((l, site, str(pos), str(h)), 0.0) + v
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    road = {}
    with open(os.path.join(a.run_dir, "metrics.csv")) as f:
        for r in csv.DictReader(f):
            road[(int(r["layer"]), r["site"], r["position"], r["heads"])] = float(r["effect_estimate"])
    keys = [k for k in road if k in est]
    x = np.array([road[k] for k in keys])
    y = np.array([est[k] for k in keys])
    worst = int(np.argmax(np.abs(x - y)))
    print(json.dumps({
        "method": a.method, "cells_compared": len(keys), "road_cells": len(road), "torch_seconds": round(secs, 2), "torch_cpu_seconds": round(cpu, 2),
        "max_abs_diff": float(np.abs(x - y).max()), "max_abs_estimate": float(np.abs(y).max()),
        "worst_cell": list(map(str, keys[worst])), "pearson": float(np.corrcoef(x, y)[0, 1]),
    }))


if __name__ == "__main__":
    main()
