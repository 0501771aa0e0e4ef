#!/usr/bin/env python3
"""pyreft 0.1.0 LoReFT on the same sentiment split as `road finetune experiments/sentiment-loreft.toml`
(issue 21), and a round trip of a road-trained LoReFT directory into pyreft.

Train mode (default): `road finetune SPEC --write-split FILE` writes the spec's exact train/dev/test
examples, template and label words; this script then trains pyreft's `LoreftIntervention` on
SmolLM2-135M (the same GGUF road loads, dequantised by transformers) with the spec's settings:
rank, positions (first_n/last_n prompt tokens, pyreft's `get_intervention_locations` with
`last_position` = the prompt length), layers (all), block_output, separate first/last interventions
(share_weights false), steps, batch, lr, warm-up + linear decay, clip 1.0, AdamW (weight decay 0),
dev evaluation every `eval_every` steps keeping the best, then test accuracy. The loss is road's:
cross-entropy over the label words' logits at the last prompt token. Batches are left-padded with
position ids counting real tokens (as road). What differs: the batch order (torch's seeded
shuffle, not road's, unless `--road-order`) and the init draws (pyreft: torch orthogonal / nn.Linear init).
Prints one JSON line: test accuracy, training seconds (the loop only), peak RSS, trainable params.

Round-trip mode (`--roundtrip DIR`): load road's `reft_config.json` + `reft_model.safetensors` into
pyreft interventions (pyreft's own `load_state_dict`) and compare last-position logits on a prompt
with `road logits --adapter DIR` (max |diff|).

Usage (repository root, venv /tmp/torchbench/venv + `pip install pyreft==0.1.0 --no-deps`):
  python bench/reference/pyreft_sentiment.py --road target/release/road \
      --model ~/.cache/road-dii/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf [--seed 0] [--threads 2]
  python bench/reference/pyreft_sentiment.py --road ... --model ... --roundtrip notebooks-out/sentiment-loreft/RUN/adapter
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tomllib

import numpy as np


def load_split(road, spec, sets):
    f = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False).name
    cmd = [road, "finetune", spec, "--write-split", f] + sum([["--set", s] for s in sets], [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
    rows = [json.loads(l) for l in open(f)]
    os.unlink(f)
    head, rows = rows[0], rows[1:]
    split = {s: [(r["text"], r["label"]) for r in rows if r["split"] == s] for s in ("train", "dev", "test")}
    return head, split


def apply_sets(method, train, sets):
    """The `--set section.key=value` overrides road applied, on the spec's method and train tables."""
    for s in sets:
        k, v = s.split("=", 1)
        sec, _, key = k.partition(".")
        if sec in ("train", "method"):
            try:
                val = tomllib.loads(f"v = {v}")["v"]
            except tomllib.TOMLDecodeError:
                val = v
            (train if sec == "train" else method)[key] = val


def read_spec(spec):
    return tomllib.load(open(spec, "rb"))


def batch_order(args, n_train, head, steps, bs):
    """The example indices, step by step: torch's seeded permutations, or with --road-order road's
    batches (its seeded sampler, recorded by --write-split): a paired comparison."""
    import torch
    if args.road_order:
        return torch.tensor(head["train_order"])
    g = torch.Generator().manual_seed(args.seed)
    return torch.cat([torch.randperm(n_train, generator=g) for _ in range(steps * bs // n_train + 1)])


def lr_schedule(args, opt, warm, steps):
    """Warm-up + linear decay: transformers' (its first step has lr 0), or with --road-schedule
    road's (train::schedule::Schedule::lr: lr·(s+1)/w at 0-based step s)."""
    import torch
    import transformers
    if args.road_schedule:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else max(0.0, 1.0 - (s - warm) / max(steps - warm, 1)))
    return transformers.get_linear_schedule_with_warmup(opt, warm, steps)


DEV = "cpu"  # set by --device


def sync():
    import torch
    if DEV != "cpu":
        torch.cuda.synchronize()


def build(model, rank, layers, share):
    import pyreft
    import torch
    d = model.config.hidden_size
    sides = 1 if share else 2
    reps = [{"layer": l, "component": "block_output", "low_rank_dimension": rank,
             "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=rank, dtype=torch.float32)}
            for _ in range(sides) for l in layers]
    rm = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps))
    rm.set_device(DEV)
    return rm


def batch_inputs(tok_ids, first_n, last_n, n_int, share):
    """Left-padded ids, mask, position ids and pyreft unit locations `[n_int, b, k]`."""
    import torch
    from pyreft.dataset import get_intervention_locations
    t = max(len(x) for x in tok_ids)
    ids, mask, locs = [], [], []
    for x in tok_ids:
        p = t - len(x)
        ids.append([0] * p + x)
        mask.append([0] * p + [1] * len(x))
        # last_position = the prompt length: the last `last_n` prompt tokens (as pyreft's generation datasets).
        loc = get_intervention_locations(last_position=len(x), first_n=first_n, last_n=last_n, pad_mode="first",
                                         num_interventions=n_int, share_weights=share)
        if any(i < 0 for row in loc for i in row):
            raise ValueError(f"a prompt of {len(x)} tokens is too short for f{first_n}+l{last_n} (pyreft would pad)")
        locs.append([[p + i for i in row] for row in loc])
    ids, mask = torch.tensor(ids, device=DEV), torch.tensor(mask, device=DEV)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    unit = torch.tensor(locs).permute(1, 0, 2).tolist()  # [n_int, b, k]
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}, unit


def class_logits(rm, texts, tok, template, max_len, label_ids, first_n, last_n, n_int, share):
    enc = [tok(template.replace("{text}", s), add_special_tokens=False)["input_ids"][-max_len:] for s in texts]
    base, unit = batch_inputs(enc, first_n, last_n, n_int, share)
    _, out = rm(base, unit_locations={"sources->base": (None, unit)})
    return out.logits[:, -1, label_ids]


def evaluate(rm, rows, bs, **kw):
    import torch
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), bs):
            ch = rows[i:i + bs]
            lg = class_logits(rm, [t for t, _ in ch], **kw)
            y = torch.tensor([l for _, l in ch], device=DEV)
            loss += torch.nn.functional.cross_entropy(lg, y, reduction="sum").item()
            correct += (lg.argmax(-1) == y).sum().item()
            n += len(ch)
    return correct / n, loss / n


def train_mode(args, model, tok):
    import torch
    spec = read_spec(args.spec)
    sets = [f"seed={args.seed}"] + args.set
    head, split = load_split(args.road, args.spec, sets)
    m, t = spec["method"], spec["train"]
    apply_sets(m, t, args.set)
    rank, share = m.get("r", 8), m.get("share_weights", False)
    pos = m.get("positions", "f1+l1")
    first_n = int(pos.split("+")[0].lstrip("f")) if "f" in pos else 0
    last_n = int(pos.split("+")[-1].lstrip("l")) if "l" in pos else 0
    layers = m.get("layers") or list(range(model.config.num_hidden_layers))
    steps, bs, lr = t["steps"], t["batch_size"], float(t["lr"])
    warm = round(t.get("warmup_ratio", 0.1) * steps)
    torch.manual_seed(args.seed)
    rm = build(model, rank, layers, share)
    n_int = len(rm.interventions)
    params = [p for p in rm.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    label_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in head["label_words"]]
    kw = dict(tok=tok, template=head["template"], max_len=head["max_len"], label_ids=label_ids,
              first_n=first_n, last_n=last_n, n_int=n_int, share=share)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=float(t.get("weight_decay", 0.0)), betas=(0.9, 0.999), eps=1e-8)
    sched = lr_schedule(args, opt, warm, steps)
    order = batch_order(args, len(split["train"]), head, steps, bs)
    best, best_state, best_step, train_secs, evals, per_step = -1.0, None, 0, 0.0, [], []
    eval_every = t.get("eval_every", 16)
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        rm.train()
        ch = [split["train"][i] for i in order[step * bs:(step + 1) * bs].tolist()]
        lg = class_logits(rm, [x for x, _ in ch], **kw)
        loss = torch.nn.functional.cross_entropy(lg, torch.tensor([l for _, l in ch], device=DEV))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.get("clip_norm", 1.0))
        opt.step()
        sched.step()
        sync()
        per_step.append(time.perf_counter() - t0)
        train_secs += per_step[-1]
        if (eval_every and (step + 1) % eval_every == 0) or step + 1 == steps:
            rm.eval()
            acc, dl = evaluate(rm, split["dev"], t.get("eval_batch", 16), **kw)
            evals.append({"step": step + 1, "dev_acc": acc, "dev_loss": dl, "train_loss": loss.item()})
            print(json.dumps(evals[-1]), file=sys.stderr, flush=True)
            if acc > best:
                best, best_step = acc, step + 1
                best_state = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, best_state):
            p.copy_(b)
    rm.eval()
    test_acc, test_loss = evaluate(rm, split["test"], t.get("eval_batch", 16), **kw)
    print(json.dumps({
        "impl": "pyreft 0.1.0", "method": f"loreft-r{rank}-f{first_n}l{last_n}", "seed": args.seed,
        "batch_order": "road" if args.road_order else "torch", "trainable_params": n_params, "trainable_pct": 100.0 * n_params / sum(p.numel() for p in model.parameters()),
        "steps": steps, "batch": bs, "lr": lr, "best_step": best_step, "dev_accuracy": best,
        "test_accuracy": test_acc, "test_loss": test_loss, "test_n": len(split["test"]),
        "train_secs": round(train_secs, 1), "secs_per_step_after_first": round(sum(per_step[1:]) / max(len(per_step) - 1, 1), 4),
        "secs_per_step_median": round(sorted(per_step[1:] or per_step)[len(per_step[1:] or per_step) // 2], 4),
        "threads": args.threads, "device": DEV,
        "peak_device_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if DEV != "cpu" else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "evals": evals,
    }), flush=True)


def roundtrip_mode(args, model, tok):
    import torch
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(args.roundtrip, "reft_config.json")))
    w = load_file(os.path.join(args.roundtrip, "reft_model.safetensors"))
    reps = cfg["representations"]
    import pyreft
    d = model.config.hidden_size
    rr = [{"layer": r["layer"], "component": "block_output", "low_rank_dimension": cfg["low_rank_dimension"],
           "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=cfg["low_rank_dimension"], dtype=torch.float32)}
          for r in reps]
    rm = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=rr))
    keys = list(rm.interventions.keys())
    for k, r in zip(keys, reps):
        iv = rm.interventions[k]
        iv = iv[0] if isinstance(iv, (list, tuple)) else iv
        iv.load_state_dict({"weight": w[r["key"] + ".weight"], "bias": w[r["key"] + ".bias"], "rotate_layer": w[r["key"] + ".rotate_layer"]})
    prompt = "Tweet: what a lovely day, I love it\nSentiment:"
    out = subprocess.run([args.road, "logits", "--model", args.model, "--prompt", prompt, "--top", "49152", "--json",
                          "--adapter", args.roundtrip], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    dj = json.loads(out.stdout)
    road = np.full(model.config.vocab_size, np.nan)
    for r in dj["top"]:
        road[r["id"]] = r["logit"]
    ids = dj["ids"]
    from pyreft.dataset import get_intervention_locations
    loc = get_intervention_locations(last_position=len(ids), first_n=cfg["first_n"], last_n=cfg["last_n"],
                                     pad_mode="first", num_interventions=len(reps), share_weights=cfg["share_weights"])
    # One unit list per intervention, in the order the representations were listed.
    order = ["first" if r["positions"] == "first" else "last" if r["positions"] == "last" else "both" for r in reps]
    f_loc, l_loc = list(range(min(len(ids) // 2, cfg["first_n"]))), list(range(len(ids) - min(len(ids) // 2, cfg["last_n"]), len(ids)))
    unit = [[f_loc if o == "first" else l_loc if o == "last" else f_loc + l_loc] for o in order]
    with torch.no_grad():
        _, o = rm({"input_ids": torch.tensor([ids])}, unit_locations={"sources->base": (None, unit)})
        base = model(torch.tensor([ids])).logits[0, -1].double().numpy()
    py = o.logits[0, -1].double().numpy()
    print(json.dumps({"roundtrip": args.roundtrip, "n_interventions": len(reps), "pyreft_locations_example": loc[0],
                      "max_abs_road_vs_pyreft": float(np.nanmax(np.abs(road - py))),
                      "intervention_effect": float(np.max(np.abs(py - base)))}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--road", required=True)
    ap.add_argument("--model", required=True, help="the SmolLM2 GGUF file road loads")
    ap.add_argument("--spec", default="experiments/sentiment-loreft.toml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE spec override (also passed to road)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (train mode; timings synchronise the device)")
    ap.add_argument("--attn", default=None, help="attention implementation (default: eager on cpu, sdpa on cuda)")
    ap.add_argument("--road-order", action="store_true", help="train on road's batch order for this seed instead of torch's")
    ap.add_argument("--road-schedule", action="store_true", help="road's warm-up, lr·(s+1)/w at 0-based step s (transformers' starts at 0)")
    ap.add_argument("--roundtrip", help="a road-written LoReFT directory to load into pyreft instead of training")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(args.threads)
    mdir, mfile = os.path.split(os.path.abspath(os.path.expanduser(args.model)))
    model = AutoModelForCausalLM.from_pretrained(mdir, gguf_file=mfile, dtype=torch.float32,
                                                 attn_implementation=args.attn or ("eager" if DEV == "cpu" else "sdpa")).to(DEV).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(mdir, gguf_file=mfile)
    (roundtrip_mode if args.roundtrip else train_mode)(args, model, tok)


if __name__ == "__main__":
    main()
