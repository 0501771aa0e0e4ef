#!/usr/bin/env python3
"""peft-made adapters of configurations the public fixtures do not cover (issue 21), against
`road logits --adapter`: OFT with the exact Cayley transform, with `block_share`, with a 3-term
Neumann series and `r` (blocks) instead of `oft_block_size`; DoRA and BOFT on other target modules
(k_proj, o_proj, gate_proj, up_proj). peft 0.21.2 with `init_weights=False` / `init_lora_weights=False`
(random, non-identity). Prints one JSON line per variant; exit status 1 if any differs by > 1e-3.

Usage: python peft_variants.py --road target/release/road --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf --out DIR
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

PROMPT = "The capital of France is"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--road", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch
    from peft import BOFTConfig, LoraConfig, OFTConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    mdir, mfile = os.path.split(os.path.abspath(args.model))
    other = ["k_proj", "o_proj", "gate_proj", "up_proj"]
    variants = {
        "oft_exact_cayley": OFTConfig(oft_block_size=16, use_cayley_neumann=False, target_modules=["q_proj", "down_proj"], init_weights=False),
        "oft_block_share": OFTConfig(oft_block_size=32, block_share=True, target_modules=["v_proj", "up_proj"], init_weights=False),
        "oft_r_3_terms": OFTConfig(r=36, oft_block_size=0, num_cayley_neumann_terms=3, target_modules=["k_proj", "o_proj"], init_weights=False),
        "dora_other_targets": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=other, init_lora_weights=False),
        "boft_other_targets": BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=1, target_modules=other, init_weights=False),
    }
    ok_all = True
    for name, conf in variants.items():
        torch.manual_seed(1)
        base = AutoModelForCausalLM.from_pretrained(mdir, gguf_file=mfile, dtype=torch.float32, attn_implementation="eager")
        model = get_peft_model(base, conf).eval()
        d = os.path.join(args.out, name)
        model.save_pretrained(d)
        out = subprocess.run([args.road, "logits", "--model", args.model, "--prompt", PROMPT, "--top", "49152", "--json", "--adapter", d],
                             capture_output=True, text=True, timeout=600)
        row = {"variant": name}
        if out.returncode != 0:
            row.update(ok=False, error=out.stderr[-500:])
        else:
            r = json.loads(out.stdout)
            road = np.full(49152, np.nan)
            for t in r["top"]:
                road[t["id"]] = t["logit"]
            with torch.no_grad():
                peft = model(torch.tensor([r["ids"]])).logits[0, -1].double().numpy()
                with model.disable_adapter():
                    plain = model(torch.tensor([r["ids"]])).logits[0, -1].double().numpy()
            row.update(max_abs=float(np.max(np.abs(road - peft))), adapter_effect=float(np.max(np.abs(peft - plain))))
            row["ok"] = row["max_abs"] <= 1e-3
        ok_all &= row["ok"]
        print(json.dumps(row), flush=True)
    sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
    main()
