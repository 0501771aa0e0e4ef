#!/usr/bin/env python3
"""peft 0.21.2 fine-tuning on the same sentiment split and protocol as
`road finetune experiments/sentiment-<kind>.toml` (issue 21's efficiency table), one kind per call.

Kinds and their peft configs (mirroring the spec files): lora (LoraConfig r, alpha, dropout),
dora (the same with use_dora=True), oft (OFTConfig oft_block_size, Cayley–Neumann terms), boft
(BOFTConfig boft_block_size, boft_n_butterfly_factor), road1/road4 (RoadConfig variant,
group_size), all on the spec's target projections of every layer. The protocol is road's and
pyreft_sentiment.py's: `road finetune SPEC --write-split` gives the exact examples; loss =
cross-entropy over the label words' logits at the last prompt token; left padding with position
ids counting real tokens; AdamW (the spec's weight decay), warm-up + linear decay, clip 1.0,
dev evaluation every `eval_every` steps keeping the best, then test accuracy (skipped with
`--no-test`, for timing-only runs). Batch order and init draws are torch's, not road's
(`--road-order`: road's batch order, for a paired comparison; `--init-adapter DIR` from
`road finetune SPEC --write-init DIR` also takes road's init draws and `--road-schedule` road's
warm-up: with `--set method.dropout=0` on both sides, only the implementations differ).
Prints one JSON line: trainable params, test accuracy, training seconds (the loop only, and per
step), peak RSS of the process.

Usage: python bench/reference/peft_sentiment.py --road target/release/road --model GGUF --kind lora
       [--seed 0] [--threads 2] [--set train.steps=4 ...] [--no-test] [--device cuda]
On cuda the model runs with sdpa attention (eager on the CPU), each timed step ends with a device
synchronise, and the JSON adds torch's peak allocated device memory.
"""
import argparse
import json
import os
import resource
import sys
import time
import tomllib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pyreft_sentiment import apply_sets, batch_order, load_split, lr_schedule  # noqa: E402

PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def peft_config(kind, m):
    from peft import BOFTConfig, LoraConfig, OFTConfig, RoadConfig
    targets = [PROJ[t] for t in m.get("targets", list(PROJ))]
    if kind in ("lora", "dora"):
        return LoraConfig(r=m.get("r", 8), lora_alpha=m.get("alpha", 16.0), lora_dropout=m.get("dropout", 0.0),
                          target_modules=targets, use_dora=kind == "dora")
    if kind == "oft":
        terms = m.get("neumann_terms", 5)
        return OFTConfig(oft_block_size=m.get("block_size", 32), r=0, target_modules=targets,
                         use_cayley_neumann=terms > 0, num_cayley_neumann_terms=max(terms, 1))
    if kind == "boft":
        return BOFTConfig(boft_block_size=m.get("block_size", 4), boft_n_butterfly_factor=m.get("butterfly_factor", 1), target_modules=targets)
    if kind == "road":
        return RoadConfig(variant=f"road_{m.get('variant', 1)}", group_size=m.get("group_size", 64), target_modules=targets)
    raise ValueError(f"unknown kind {kind}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--road", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--kind", required=True, help="lora, dora, oft, boft, road1 or road4 (experiments/sentiment-<kind>.toml)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--no-test", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings then synchronise the device each step)")
    ap.add_argument("--road-order", action="store_true", help="train on road's batch order for this seed instead of torch's")
    ap.add_argument("--attn", default=None, help="attention implementation (default: eager on cpu, sdpa on cuda)")
    ap.add_argument("--init-adapter", default=None, help="start from this adapter's parameters (`road finetune SPEC --write-init DIR`: road's init draws for the seed)")
    ap.add_argument("--road-schedule", action="store_true", help="road's warm-up, lr·(s+1)/w at 0-based step s (transformers' starts at lr·s/w, i.e. 0)")
    args = ap.parse_args()
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(args.threads)
    spec_path = f"experiments/sentiment-{args.kind}.toml"
    spec = tomllib.load(open(spec_path, "rb"))
    m, t = spec["method"], spec["train"]
    apply_sets(m, t, args.set)
    head, split = load_split(args.road, spec_path, [f"seed={args.seed}"] + args.set)
    mdir, mfile = os.path.split(os.path.abspath(os.path.expanduser(args.model)))
    base = AutoModelForCausalLM.from_pretrained(mdir, gguf_file=mfile, dtype=torch.float32,
                                                attn_implementation=args.attn or ("eager" if args.device == "cpu" else "sdpa")).to(args.device)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tok = AutoTokenizer.from_pretrained(mdir, gguf_file=mfile)
    n_base = sum(p.numel() for p in base.parameters())
    torch.manual_seed(args.seed)
    model = get_peft_model(base, peft_config(m["kind"], m))
    if args.init_adapter:  # road's init draws: with --road-order, dropout 0 and --road-schedule, a fully paired run
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        sd = load_file(os.path.join(args.init_adapter, "adapter_model.safetensors"))
        res = set_peft_model_state_dict(model, sd)
        if res.unexpected_keys:
            raise SystemExit(f"--init-adapter: keys peft does not know: {res.unexpected_keys[:3]}")
        missing = [k for k in res.missing_keys if any(t in k for t in ("lora_", "oft_", "boft_", "road_"))]
        if missing:
            raise SystemExit(f"--init-adapter: adapter parameters missing from {args.init_adapter}: {missing[:3]}")
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    label_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in head["label_words"]]

    def logits(texts):
        enc = [tok(head["template"].replace("{text}", s), add_special_tokens=False)["input_ids"][-head["max_len"]:] for s in texts]
        w = max(len(x) for x in enc)
        ids = torch.tensor([[0] * (w - len(x)) + x for x in enc], device=dev)
        mask = torch.tensor([[0] * (w - len(x)) + [1] * len(x) for x in enc], device=dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1, label_ids]

    def evaluate(rows, bs):
        model.eval()
        correct = n = 0
        with torch.no_grad():
            for i in range(0, len(rows), bs):
                ch = rows[i:i + bs]
                correct += (logits([x for x, _ in ch]).argmax(-1) == torch.tensor([l for _, l in ch], device=dev)).sum().item()
                n += len(ch)
        return correct / n

    steps, bs, lr = t["steps"], t["batch_size"], float(t["lr"])
    wd = float(t.get("weight_decay", 0.01 if m["kind"] in ("lora",) else 0.0))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8)
    sched = lr_schedule(args, opt, round(t.get("warmup_ratio", 0.1) * steps), steps)
    order = batch_order(args, len(split["train"]), head, steps, bs)
    best, best_state, best_step, secs, per_step, losses = -1.0, None, 0, 0.0, [], []
    eval_every = t.get("eval_every", 16)
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        model.train()
        ch = [split["train"][i] for i in order[step * bs:(step + 1) * bs].tolist()]
        loss = torch.nn.functional.cross_entropy(logits([x for x, _ in ch]), torch.tensor([l for _, l in ch], device=dev))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.get("clip_norm", 1.0))
        opt.step()
        sched.step()
        sync()
        per_step.append(time.perf_counter() - t0)
        secs += per_step[-1]
        losses.append(round(loss.item(), 6))  # after the timed region (item() synchronises)
        if not args.no_test and ((eval_every and (step + 1) % eval_every == 0) or step + 1 == steps):
            acc = evaluate(split["dev"], t.get("eval_batch", 16))
            print(json.dumps({"step": step + 1, "dev_acc": acc, "train_loss": loss.item()}), file=sys.stderr, flush=True)
            if acc > best:
                best, best_step = acc, step + 1
                best_state = [p.detach().clone() for p in params]
    test = None
    if not args.no_test:
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
        test = evaluate(split["test"], t.get("eval_batch", 16))
    print(json.dumps({
        "impl": "peft 0.21.2", "kind": args.kind, "seed": args.seed, "trainable_params": n_params,
        "trainable_pct": 100.0 * n_params / n_base, "steps": steps, "batch": bs, "lr": lr,
        "best_step": best_step, "dev_accuracy": best if best >= 0 else None, "test_accuracy": test,
        "train_secs": round(secs, 1), "secs_per_step_after_first": round(sum(per_step[1:]) / max(len(per_step) - 1, 1), 4),
        "secs_per_step_median": round(sorted(per_step[1:] or per_step)[len(per_step[1:] or per_step) // 2], 4),
        "threads": args.threads, "device": args.device, "batch_order": "road" if args.road_order else "torch", "init": args.init_adapter or "torch", "schedule": "road" if args.road_schedule else "transformers", "losses": losses, "step_secs": [round(x, 4) for x in per_step],
        "peak_device_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if dev.type == "cuda" else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }), flush=True)


if __name__ == "__main__":
    main()
