#!/usr/bin/env python3
"""Round trip of road-trained adapters into peft (issue 21): for each method, `road finetune` a few
steps of experiments/sentiment-<kind>.toml on SmolLM2-135M, then load the saved adapter with
`PeftModel.from_pretrained` and check that
  1. peft's adapter state dict holds exactly the saved tensors (same names, bit-equal values), and
  2. peft's last-position logits equal `road logits --adapter DIR` (max |diff| <= 1e-3).
Prints one JSON line per kind and a summary; exit status 1 if any kind fails.

Usage: python peft_roundtrip.py --road target/release/road --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf
       [--kinds lora,dora,oft,boft,road1] [--steps 3] [--adapters KIND=DIR ...]
(`--adapters` skips training and checks existing road-written adapter directories.)
Run from the repository root (the experiment files are read from experiments/).
"""
import argparse
import glob
import json
import os
import subprocess
import sys

import numpy as np

PROMPT = "The capital of France is"


def finetune(road, kind, steps):
    name = f"peft-roundtrip-{kind}"
    cmd = [road, "finetune", f"experiments/sentiment-{kind}.toml", "--set", f"name={name}",
           "--set", f"train.steps={steps}", "--set", "train.eval_every=0", "--set", "data.train_examples=64",
           "--set", "data.dev_examples=8", "--set", "data.test_examples=8", "--set", "train.max_len=48"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
    runs = sorted(glob.glob(f"notebooks-out/{name}/*/adapter"), key=os.path.getmtime)
    if not runs:
        raise RuntimeError(f"no adapter written under notebooks-out/{name}/")
    return runs[-1]


def road_logits(road, model, adapter):
    # --top beyond the vocabulary: road returns every logit (49,152 for SmolLM2, 151,936 for Qwen2.5)
    cmd = [road, "logits", "--model", model, "--prompt", PROMPT, "--top", "1000000", "--json"] + (["--adapter", adapter] if adapter else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
    d = json.loads(out.stdout)
    v = np.full(len(d["top"]), np.nan, dtype=np.float64)
    for r in d["top"]:
        v[r["id"]] = r["logit"]
    return v, d["ids"]


def peft_check(base_loader, adapter, ids):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    model = PeftModel.from_pretrained(base_loader(), adapter).eval()
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    missing = sorted(set(saved) - set(loaded))
    extra = sorted(set(loaded) - set(saved))
    changed = [k for k in saved if k in loaded and not torch.equal(saved[k], loaded[k].cpu())]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double().numpy()
    return logits, {"missing": missing[:3], "extra": extra[:3], "changed": changed[:3],
                    "n_missing": len(missing), "n_extra": len(extra), "n_changed": len(changed)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--road", required=True)
    ap.add_argument("--model", required=True, help="the GGUF file (SmolLM2's; another registered model's with --adapters)")
    ap.add_argument("--kinds", default="lora,dora,oft,boft,road1")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--adapters", nargs="*", default=[], help="KIND=DIR: check these instead of training")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    mdir, mfile = os.path.split(os.path.abspath(args.model))

    def base_loader():
        return AutoModelForCausalLM.from_pretrained(mdir, gguf_file=mfile, dtype=torch.float32, attn_implementation="eager")

    plain, _ = road_logits(args.road, args.model, None)
    todo = [tuple(a.split("=", 1)) for a in args.adapters] or [(k, None) for k in args.kinds.split(",")]
    ok_all = True
    for kind, adapter in todo:
        row = {"kind": kind}
        try:
            adapter = adapter or finetune(args.road, kind, args.steps)
            row["adapter"] = adapter
            row["peft_type"] = json.load(open(os.path.join(adapter, "adapter_config.json")))["peft_type"]
            road, ids = road_logits(args.road, args.model, adapter)
            peft, state = peft_check(base_loader, adapter, ids)
            row.update(state)
            row["max_abs"] = float(np.max(np.abs(road - peft)))
            row["top1_same"] = bool(np.argmax(road) == np.argmax(peft))
            # How far the adapter moves the logits at all (a parity check of a no-op proves little).
            row["adapter_effect"] = float(np.max(np.abs(road - plain)))
            row["ok"] = state["n_missing"] == 0 and state["n_extra"] == 0 and state["n_changed"] == 0 and row["max_abs"] <= 1e-3
        except Exception as e:  # one kind failing must not hide the others' results
            row["error"] = str(e)[-500:]
            row["ok"] = False
        ok_all &= row["ok"]
        print(json.dumps(row), flush=True)
    print("SUMMARY", "all kinds load back in peft unchanged" if ok_all else "FAILURES above")
    sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
    main()
