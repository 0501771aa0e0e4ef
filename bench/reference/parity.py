#!/usr/bin/env python3
"""GPU parity for road: last-position logits of SmolLM2 prompts, `road logits --top ALL --json`
on cuda (f32, bf16) vs road on the CPU (same machine) and vs the transformers reference
(shared/reference/public.safetensors, f32).

Usage: python parity.py --road PATH/road --model SmolLM2.gguf --ref DIR [--prompts 6] [--out parity.csv]
"""
import argparse
import concurrent.futures as cf
import json
import subprocess
import sys

import numpy as np


def road_logits(road, model, prompt, device, dtype, adapter=None):
    cmd = [road, "logits", "--model", model, "--prompt", prompt, "--top", "49152", "--json",
           "--device", device, "--dtype", dtype]
    if adapter:
        cmd += ["--adapter", adapter]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
    return parse_logits(out.stdout)


def parse_logits(text):
    """(full-vocabulary logits, prompt ids) from `road logits --top 49152 --json` output."""
    d = json.loads(text)
    v = np.full(49152, np.nan, dtype=np.float64)
    for r in d["top"]:
        v[r["id"]] = r["logit"]
    return v, d["ids"]


def report(rows, path):
    """Write (prompt, a, b, max_abs, mean_abs, top1_same) rows to a CSV and print a summary per pair."""
    with open(path, "w") as f:
        f.write("prompt,a,b,max_abs,mean_abs,top1_same\n")
        for r in rows:
            f.write(",".join(str(x) for x in r) + "\n")
    for x, y in sorted({(r[1], r[2]) for r in rows}):
        sel = [r for r in rows if (r[1], r[2]) == (x, y)]
        print(f"SUMMARY max|{x} - {y}|: {min(r[3] for r in sel):.3e} .. {max(r[3] for r in sel):.3e} "
              f"(mean abs {np.mean([r[4] for r in sel]):.2e}), top1 same {sum(r[5] for r in sel)}/{len(sel)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--road", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ref", required=True, help="folder with public.json, public.safetensors, public_peft_road_1/")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--out", default="parity.csv")
    args = ap.parse_args()
    from safetensors.numpy import load_file

    meta = json.load(open(f"{args.ref}/public.json"))
    ref = load_file(f"{args.ref}/public.safetensors")
    jobs = [(i, p["prompt"], None, f"p{i}.last_logits") for i, p in enumerate(meta["prompts"][: args.prompts])]
    pr = meta["peft_road"]["road_1"]
    jobs.append(("road_1", pr["prompt"], f"{args.ref}/{pr['adapter_dir']}", "peft_road_1.last_logits"))

    # The CPU runs go in parallel (16 cores there) while the GPU runs go one at a time.
    with cf.ThreadPoolExecutor(max_workers=4) as pool:
        cpu = {j[0]: pool.submit(road_logits, args.road, args.model, j[1], "cpu", "f32", j[2]) for j in jobs}
        rows = []
        for key, prompt, adapter, ref_key in jobs:
            r = ref[ref_key].astype(np.float64)
            c, _ = cpu[key].result()
            for dtype, tol in (("f32", 1e-3), ("bf16", 5e-2)):
                try:
                    g, _ = road_logits(args.road, args.model, prompt, "cuda", dtype, adapter)
                except Exception as e:
                    print(f"{key} cuda {dtype}: FAILED {e}", file=sys.stderr)
                    continue
                d_cpu = float(np.nanmax(np.abs(g - c)))
                d_ref = float(np.nanmax(np.abs(g - r)))
                top1 = int(np.nanargmax(g)) == int(np.argmax(r))
                rows.append((key, dtype, d_cpu, d_ref, float(np.nanmax(np.abs(c - r))), top1, float(np.abs(r).max()), tol))
                print(f"prompt {key} cuda {dtype}: max|gpu-cpu| {d_cpu:.2e}  max|gpu-ref| {d_ref:.2e}  "
                      f"(cpu-ref {rows[-1][4]:.2e}, max|logit| {rows[-1][6]:.1f})  top1 same {top1}  "
                      f"-> {'PASS' if max(d_cpu, d_ref) <= tol else 'OVER'} tol {tol}", flush=True)
    with open(args.out, "w") as f:
        f.write("prompt,dtype,max_abs_gpu_cpu,max_abs_gpu_ref,max_abs_cpu_ref,top1_same,max_abs_logit,tol\n")
        for r in rows:
            f.write(",".join(str(x) for x in r) + "\n")
    for dtype in ("f32", "bf16"):
        sel = [r for r in rows if r[1] == dtype]
        if sel:
            print(f"SUMMARY cuda {dtype}: worst max|gpu-cpu| {max(r[2] for r in sel):.2e}, "
                  f"worst max|gpu-ref| {max(r[3] for r in sel):.2e} over {len(sel)} prompts")


if __name__ == "__main__":
    main()
