#!/usr/bin/env python3
"""GPU vs CPU parity in the same dtype: the fixture prompts' full-vocabulary logits from
`gpu-run.sh L` (cuda_{bf16,f32}_{i}.json, written on the H200) against `road logits` on this
machine's CPU in the same dtype (and the CPU's f32). BENCHMARKS.md, GPU parity.

Usage: python parity_devices.py --road target/release/road --cuda-dir DIR --ref ../shared/reference [--out CSV]
"""
import argparse
import json
import os

import numpy as np

from parity import parse_logits, report, road_logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--road", required=True)
    ap.add_argument("--cuda-dir", required=True)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="gpu-parity-devices.csv")
    a = ap.parse_args()
    rows = []
    for i, p in enumerate(json.load(open(f"{a.ref}/public.json"))["prompts"]):
        cpu = {dt: road_logits(a.road, a.model, p["prompt"], "cpu", dt)[0] for dt in ("bf16", "f32")}
        for dt in ("bf16", "f32"):
            f = os.path.join(a.cuda_dir, f"cuda_{dt}_{i}.json")
            if not os.path.exists(f):
                continue
            g = parse_logits(open(f).read())[0]
            for ref_dt in sorted({dt, "f32"}):
                d = np.abs(g - cpu[ref_dt])
                same = int(np.nanargmax(g) == np.nanargmax(cpu[ref_dt]))
                rows.append((i, f"cuda_{dt}", f"cpu_{ref_dt}", float(np.nanmax(d)), float(np.nanmean(d)), same))
                print(f"prompt {i}: max|cuda {dt} - cpu {ref_dt}| {rows[-1][3]:.3e} mean {rows[-1][4]:.3e} top1 same {same}")
        d = np.abs(cpu["bf16"] - cpu["f32"])
        rows.append((i, "cpu_bf16", "cpu_f32", float(np.nanmax(d)), float(np.nanmean(d)), int(np.nanargmax(cpu["bf16"]) == np.nanargmax(cpu["f32"]))))
    report(rows, a.out)


if __name__ == "__main__":
    main()
