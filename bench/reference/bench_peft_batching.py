#!/usr/bin/env python3
"""peft baseline for `road bench batching`: mixed-adapter batches (row r uses adapter r % n) for
RoAd (road_1, group 64) vs LoRA (r=8) vs the plain model, on every projection of every layer.

Same workload as road: prompts of --prompt-len pseudo-text ids, greedy generation of T tokens per
row with a KV cache (manual loop: one prefill, then T-1 single-token steps; no EOS stop), timed
from the prefill to the last token; tokens/s = batch * T / seconds. Mixed batches go through
peft's `adapter_names=` forward argument (one adapter name per row).

Usage: python bench_peft_batching.py --device cuda --dtype bf16 --batches 1,8,32 --adapters 8 --tokens 32
"""
import argparse
import copy
import inspect
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL = "/root/.cache/road-dii/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def ints(s):
    return [int(x) for x in s.split(",") if x]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=ints, default=[1, 2, 4, 8, 16])
    ap.add_argument("--adapters", type=ints, default=[1, 8])
    ap.add_argument("--tokens", type=ints, default=[16, 64])
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--road-group", type=int, default=64)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()

    import torch
    import transformers
    import peft
    from transformers import AutoModelForCausalLM

    from bench_torch import torch_setup

    dev, dtype, sync = torch_setup(args.device, args.dtype, args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"device {dev}, dtype {dtype}")

    if os.path.isdir(args.model):  # a HF checkpoint directory (quick checks on tiny models)
        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        mdir, mfile = os.path.split(os.path.abspath(args.model))
        base = AutoModelForCausalLM.from_pretrained(mdir, gguf_file=mfile, dtype=dtype)
    base = base.to(dev).eval()
    print(f"model {type(base).__name__}, {base.config.num_hidden_layers} layers", flush=True)
    max_n = max(args.adapters)

    def with_adapters(kind):
        from peft import get_peft_model
        if kind == "lora":
            from peft import LoraConfig
            cfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                             target_modules=TARGETS, init_lora_weights=False)  # random, non-identity
        else:
            from peft import RoadConfig
            cfg = RoadConfig(variant="road_1", group_size=args.road_group, target_modules=TARGETS, init_weights=False)
        pm = get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
        for i in range(1, max_n):
            pm.add_adapter(f"a{i}", cfg)
        return pm.to(dev).eval()

    new_api = "cache" in inspect.signature(base.forward).parameters
    kv_kw = "cache" if new_api else "past_key_values"

    def get_kv(o):
        return o.cache if new_api else o.past_key_values

    def generate(model, b, n, t):
        ids = torch.tensor([[(r * 7919 + i * 104729 + 17) % min(40000, base.config.vocab_size - 100) + 100 for i in range(args.prompt_len)]
                            for r in range(b)], device=dev)
        extra = {} if n == 0 else {"adapter_names": [f"a{r % n}" for r in range(b)]}
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **extra)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        nxt.cpu()
        prefill = time.perf_counter() - t0
        past = get_kv(out)
        t1 = time.perf_counter()
        for _ in range(t - 1):
            out = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{kv_kw: past}, **extra)
            past = get_kv(out)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            nxt.cpu()  # the host needs each token (as road's loop does)
        return prefill, time.perf_counter() - t1

    rows = []
    models = {"base": base}
    for kind in ("road", "lora"):
        try:
            models[kind] = with_adapters(kind)
        except Exception as e:
            print(f"{kind}: cannot build peft adapters ({type(e).__name__}: {e})", file=sys.stderr)
    print(f"{'method':<6} {'n':>3} {'batch':>5} {'tokens':>6} {'tokens/s':>10}")
    with torch.inference_mode():
        for b in args.batches:
            configs = [("base", 0)] + [(k, n) for n in args.adapters if n <= max(b, 1) for k in ("road", "lora")]
            for method, n in configs:
                if method not in models:
                    continue
                try:
                    generate(models[method], b, n, 2)  # warm-up
                    for t in args.tokens:
                        p, d = generate(models[method], b, n, t)
                        tps = b * t / (p + d)
                        rows.append((method, n, b, t, p, d, tps))
                        print(f"{method:<6} {n:>3} {b:>5} {t:>6} {tps:>10.1f}", flush=True)
                except Exception as e:
                    print(f"{method} n={n} b={b}: failed ({type(e).__name__}: {e})", file=sys.stderr)
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("method,n_adapters,batch,gen_tokens,prefill_s,decode_s,tokens_per_s\n")
            for r in rows:
                f.write(",".join(str(x) for x in r) + "\n")


if __name__ == "__main__":
    main()
