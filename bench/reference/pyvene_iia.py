#!/usr/bin/env python3
"""pyvene 0.1.8 on road-dii's own pairs: train DAS / Boundless DAS at one site and report IIA.

Reads a road run folder's `pairs.jsonl` (the exact base/source/labels/positions per split that
road trained and evaluated on), trains pyvene's `LowRankRotatedSpaceIntervention` (rank R, torch
orthogonal parametrisation, as pyvene does) or `BoundlessRotatedSpaceIntervention` (full
rotation + learned boundary, temperature annealed, loss + lambda*boundary as in pyvene's Boundless
tutorial) on `block_output` of layer L (the residual stream after block L) at a named position
of base and source, with cross-entropy of the intervened last-position logits against
`cf_label`, Adam, batches drawn like road (a (base length, base position) group chosen in
proportion to its size, shuffled epochs within the group). Reports train/test IIA (argmax over the
whole vocabulary == cf_label), the loss curve, dev IIA every --eval-every steps with seconds, and
examples/s, as one JSON line (stdout, and appended to --out if given).

Usage:
  /tmp/torchbench/venv/bin/python bench/reference/pyvene_iia.py RUN_DIR|pairs.jsonl \
      --layer 20 --position last --kind das --rank 1 --steps 50 --batch 16 --lr 1e-2 --seed 0
  ... --kind boundless --lr 1e-3 --boundary-lr 1e-2 --temperature 50 0.1 --penalty 1.0

The driver `das_side_by_side.py` imports this module (load_model once, then train_eval per cell).
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEFAULT_MODEL = "/root/.cache/road-dii/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"


def read_pairs(path):
    if os.path.isdir(path):
        path = os.path.join(path, "pairs.jsonl")
    out = {"train": [], "dev": [], "test": []}
    with open(path) as f:
        for line in f:
            if line.strip():
                p = json.loads(line)
                out.setdefault(p["split"], []).append(p)
    for v in out.values():
        v.sort(key=lambda p: p["index"])
    return out


def load_model(model_path=DEFAULT_MODEL, threads=2, device="cpu", dtype="f32", attn="sdpa"):
    import torch
    from bench_torch import load_gguf, torch_setup
    dev, dt, sync = torch_setup(device, dtype, threads)
    model, used = load_gguf(model_path, dt, attn)
    model = model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # pyvene 0.1.8 keys its model tables by class (see bench_pyvene.py)
    from pyvene.models import intervenable_modelcard as mc
    if type(model) not in mc.type_to_module_mapping:
        from pyvene.models.llama import modelings_intervenable_llama as pl
        mc.type_to_module_mapping[type(model)] = pl.llama_lm_type_to_module_mapping
        mc.type_to_dimension_mapping[type(model)] = pl.llama_lm_type_to_dimension_mapping
    return {"model": model, "dev": dev, "dtype": dt, "sync": sync, "attn": used}


def groups_of(pairs, position, skipped):
    """Pairs by (base length, base position, source length): each group batches without padding."""
    g = {}
    for i, p in enumerate(pairs):
        b, s = p["base"], p["source"]
        if position not in b["positions"] or position not in s["positions"]:
            skipped.append((p["split"], p["index"], f"no position {position}"))
            continue
        key = (len(b["ids"]), b["positions"][position], len(s["ids"]))
        g.setdefault(key, []).append(i)
    return [g[k] for k in sorted(g)]


def train_eval(M, pairs, layer, position, kind="das", rank=1, steps=50, batch=16, lr=1e-2,
               boundary_lr=1e-2, temperature=(50.0, 0.1), penalty=1.0, seed=0, eval_every=10,
               log=print):
    import numpy as np
    import torch
    import pyvene as pv
    model, dev, sync = M["model"], M["dev"], M["sync"]
    skipped = []
    split_groups = {s: groups_of(pairs[s], position, skipped) for s in ("train", "dev", "test")}
    if skipped:
        log(f"note: skipped {len(skipped)} pairs without position {position}: {skipped[:3]}")
    for s, gs in split_groups.items():
        if not gs:
            raise SystemExit(f"split {s}: no pairs at position {position}")

    torch.manual_seed(seed)
    if kind == "das":
        rc = pv.RepresentationConfig(layer, "block_output", "pos", 1, low_rank_dimension=rank)
        itype = pv.LowRankRotatedSpaceIntervention
    elif kind == "boundless":
        rc = pv.RepresentationConfig(layer, "block_output", "pos", 1)
        itype = pv.BoundlessRotatedSpaceIntervention
    else:
        raise SystemExit(f"unknown kind {kind}")
    iv = pv.IntervenableModel(pv.IntervenableConfig(representations=[rc], intervention_types=itype), model)
    iv.disable_model_gradients()
    iv.set_device(dev)
    mods = [(v[0] if isinstance(v, tuple) else v) for v in iv.interventions.values()]
    assert len(mods) == 1
    I = mods[0]
    I.to(dev)
    if kind == "das":
        groups = [{"params": list(I.rotate_layer.parameters()), "lr": lr}]
    else:
        # pyvene's Boundless tutorial: Adam, rotation at lr, boundary at its own lr; temperature fixed by schedule
        groups = [{"params": list(I.rotate_layer.parameters()), "lr": lr},
                  {"params": [I.intervention_boundaries], "lr": boundary_lr}]
        I.temperature.requires_grad_(False)
    n_params = sum(p.numel() for g in groups for p in g["params"])
    opt = torch.optim.Adam(groups)
    temps = torch.linspace(temperature[0], temperature[1], steps) if kind == "boundless" else None

    def tensors(split, idx):
        ps = [pairs[split][i] for i in idx]
        b = torch.tensor([p["base"]["ids"] for p in ps], dtype=torch.long, device=dev)
        s = torch.tensor([p["source"]["ids"] for p in ps], dtype=torch.long, device=dev)
        bl = [[[p["base"]["positions"][position]] for p in ps]]
        sl = [[[p["source"]["positions"][position]] for p in ps]]
        y = torch.tensor([p["cf_label"] for p in ps], dtype=torch.long, device=dev)
        return b, s, bl, sl, y

    def forward(b, s, bl, sl):
        _, cf = iv({"input_ids": b, "logits_to_keep": 1}, [{"input_ids": s, "logits_to_keep": 1}],
                   unit_locations={"sources->base": (sl, bl)})
        return cf.logits[:, -1, :].float()

    def evaluate(split):
        correct, n, tot_loss = 0, 0, 0.0
        with torch.no_grad():
            for g in split_groups[split]:
                for k in range(0, len(g), 32):
                    b, s, bl, sl, y = tensors(split, g[k:k + 32])
                    lg = forward(b, s, bl, sl)
                    correct += int((lg.argmax(-1) == y).sum())
                    tot_loss += float(torch.nn.functional.cross_entropy(lg, y, reduction="sum"))
                    n += len(y)
        return correct / n, tot_loss / n, n

    # road's batch order: pick a group with probability |g| / total, then the next `batch` of
    # that group's current shuffled epoch (reshuffled when exhausted)
    rng = np.random.default_rng(seed)
    tg = [list(g) for g in split_groups["train"]]
    cursors = [len(g) for g in tg]
    total = sum(len(g) for g in tg)

    def draw():
        r = int(rng.integers(total))
        gi = 0
        while r >= len(tg[gi]):
            r -= len(tg[gi])
            gi += 1
        g = tg[gi]
        idx = []
        while len(idx) < min(batch, len(g)):
            if cursors[gi] >= len(g):
                rng.shuffle(g)
                cursors[gi] = 0
            idx.append(g[cursors[gi]])
            cursors[gi] += 1
        return idx

    losses, betas, dev_curve = [], [], []
    train_s, examples = 0.0, 0
    wall0 = time.perf_counter()
    d0 = evaluate("dev")
    dev_curve.append({"step": 0, "dev_iia": d0[0], "dev_loss": d0[1], "train_seconds": 0.0,
                      "wall_seconds": time.perf_counter() - wall0})
    for step in range(steps):
        sync()
        t = time.perf_counter()
        if temps is not None:
            I.set_temperature(temps[step].to(dev))
        b, s, bl, sl, y = tensors("train", draw())
        lg = forward(b, s, bl, sl)
        loss = torch.nn.functional.cross_entropy(lg, y)
        if kind == "boundless":
            loss = loss + penalty * I.intervention_boundaries.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lv = loss.item()
        sync()
        train_s += time.perf_counter() - t
        examples += len(y)
        losses.append(lv)
        if kind == "boundless":
            betas.append(float(torch.clamp(I.intervention_boundaries.detach(), 1e-3, 1)[0]))
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            di, dl, _ = evaluate("dev")
            dev_curve.append({"step": step + 1, "dev_iia": di, "dev_loss": dl, "train_seconds": train_s,
                              "wall_seconds": time.perf_counter() - wall0})
    tr = evaluate("train")
    te = evaluate("test")
    res = {
        "tool": "pyvene", "layer": layer, "site": "block_output", "position": position, "kind": kind,
        "rank": rank if kind == "das" else None, "seed": seed, "steps": steps, "batch": batch, "lr": lr,
        "boundary_lr": boundary_lr if kind == "boundless" else None,
        "temperature": list(temperature) if kind == "boundless" else None,
        "penalty": penalty if kind == "boundless" else None,
        "trainable_params": n_params,
        "train_iia": tr[0], "train_n": tr[2], "train_eval_loss": tr[1],
        "test_iia": te[0], "test_n": te[2], "test_eval_loss": te[1],
        "dev_iia": dev_curve[-1]["dev_iia"],
        "final_loss": losses[-1], "loss_first": losses[0],
        "final_loss_mean5": sum(losses[-5:]) / len(losses[-5:]),
        "loss_curve": losses, "beta_curve": betas or None, "dev_curve": dev_curve,
        "train_seconds": train_s, "examples_per_s": examples / train_s if train_s else None,
        "skipped": len(skipped),
    }
    if kind == "boundless":
        res["final_beta"] = betas[-1]
        res["subspace_dims"] = round(betas[-1] * model.config.hidden_size)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="road run folder or pairs.jsonl")
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--position", required=True)
    ap.add_argument("--kind", default="das", choices=["das", "boundless"])
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--boundary-lr", type=float, default=1e-2)
    ap.add_argument("--temperature", type=float, nargs=2, default=[50.0, 0.1])
    ap.add_argument("--penalty", type=float, default=1.0, help="lambda of the boundary penalty (boundless)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="append the JSON line here")
    args = ap.parse_args()
    pairs = read_pairs(args.run)
    t = time.perf_counter()
    M = load_model(args.model, args.threads, args.device)
    print(f"model loaded in {time.perf_counter() - t:.1f}s (attention {M['attn']}); pairs "
          + ", ".join(f"{k} {len(v)}" for k, v in pairs.items()), file=sys.stderr)
    res = train_eval(M, pairs, args.layer, args.position, args.kind, args.rank, args.steps, args.batch,
                     args.lr, args.boundary_lr, tuple(args.temperature), args.penalty, args.seed,
                     args.eval_every, log=lambda m: print(m, file=sys.stderr))
    res["pairs"] = os.path.abspath(args.run)
    line = json.dumps(res)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    print(f"pyvene {args.kind} L{args.layer}@{args.position}: train IIA {res['train_iia']:.3f} test IIA "
          f"{res['test_iia']:.3f} loss {res['loss_first']:.3f} -> {res['final_loss']:.3f}, "
          f"{res['examples_per_s']:.1f} examples/s", file=sys.stderr)


if __name__ == "__main__":
    main()
