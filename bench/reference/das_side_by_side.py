#!/usr/bin/env python3
"""road-dii vs pyvene 0.1.8, results side by side on the same pairs (issue 14).

For each config (task variable, site, kind, rank, seed) the driver runs road (`road run` on the
experiment file with `--set` overrides) and then pyvene (`pyvene_iia.py`) on that run's
`pairs.jsonl` with the same steps / batch / lr, and writes one CSV row per config (road and
pyvene test/train IIA, losses, seconds) plus a markdown table on stdout.

Phases (default: all three, in order; each is resumable, results are cached under --work):
  road    road runs. Sites of one (task, variable, kind, rank, seed, hyper-parameters) group that
          share a position go into one road run with several layers (`--road-cells multi`, the
          default: the pairs are the same, only the per-cell init seed differs, and the model
          load + accuracy filter + activation cache is paid once), or one run per site
          (`--road-cells single`). Appends to WORK/road.jsonl.
  pyvene  pyvene on each config's pairs.jsonl (model loaded once). Appends to WORK/pyvene.jsonl.
          Can run elsewhere (e.g. `--device cuda` on the GPU machine) given road.jsonl and the
          pairs files; --pairs-root rewrites the run-folder prefix.
  table   joins both into --csv and prints the markdown tables (per config, and means over seeds).
  roadtable  road only (not in "all"): RoAd-DII beside DAS of several ranks, means over seeds
          (grids a, b, g, h, i; `--csv docs/results/road-dii-vs-das.csv`).

Usage (CPU, from the repo root so data/ resolves):
  /tmp/torchbench/venv/bin/python bench/reference/das_side_by_side.py --grid a \
      --road /tmp/h3/road --work /tmp/h3/sbs [--road-old] [--phase road|pyvene|table|all]
Grids: a = IOI s_position rank-1 DAS at 6 sites x 3 seeds (issue 14's table); b = rank-4 DAS;
c = Boundless DAS; d = IOI io_name rank-1; e = capitals country rank-1; f = io_name rank 32 (see GRIDS below).
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

SEEDS = [0, 1, 2]
DAS = dict(kind="das", steps=50, batch=16, lr=1e-2)
BOUNDLESS = dict(kind="boundless", steps=50, batch=16, lr=1e-3, boundary_lr=1e-2,
                 temperature=(50.0, 0.1), penalty=1.0)
# RoAd-DII at the DAS budget (50 steps x batch 16): RoAd1 basis (adjacent pairs), a learned
# sigmoid mask over the blocks' first coordinates (experiments/ioi-road-dii.toml's settings), or a
# fixed selection of `rank` blocks. road only (pyvene has no such kind): compared with road's DAS.
ROAD_DII = dict(kind="road_dii", steps=50, batch=16, lr=2e-2, boundary_lr=5e-2, temperature=(1.0, 0.05),
                penalty=0.1, selection="learned")
IOI_S = dict(task="ioi", variable="s_position", spec="experiments/ioi-das.toml")
IOI_IO = dict(task="ioi", variable="io_name", spec="experiments/ioi-das.toml")
CAPS = dict(task="capitals", variable="country", spec="experiments/capitals-boundless.toml")

GRIDS = {
    "a": [dict(**IOI_S, **DAS, rank=1, sites=[(20, "last"), (22, "last"), (18, "S2"), (8, "last"),
                                             (12, "last"), (16, "last")])],
    "b": [dict(**IOI_S, **DAS, rank=4, sites=[(20, "last"), (18, "S2")])],
    "c": [dict(**IOI_S, **BOUNDLESS, rank=None, sites=[(18, "S2"), (20, "last")])],
    "d": [dict(**IOI_IO, **DAS, rank=1, sites=[(20, "last"), (12, "IO")])],
    "e": [dict(**CAPS, **DAS, rank=1, sites=[(10, "subject_last"), (16, "last")])],
    # a name is a many-valued variable: rank 1 cannot carry it (d gives 0 on both sides)
    "f": [dict(**IOI_IO, **DAS, rank=32, sites=[(12, "IO"), (20, "last")])],
    # RoAd-DII beside grids a/b (same sites with signal, same seeds)
    "g": [dict(**IOI_S, **ROAD_DII, rank=None, sites=[(20, "last"), (22, "last"), (18, "S2")])],
    "h": [dict(**IOI_S, **{**ROAD_DII, "selection": "fixed"}, rank=r, sites=[(20, "last"), (18, "S2")])
          for r in (1, 4, 16, 64)],
    # DAS at ranks near what RoAd-DII's learned mask ends with (grid g's road_final_dims)
    "i": [dict(**IOI_S, **DAS, rank=r, sites=[(20, "last"), (18, "S2")]) for r in (16, 64)],
}


def configs(grid_names, seeds):
    out = []
    for g in grid_names:
        for block in GRIDS[g]:
            for seed in seeds:
                for layer, pos in block["sites"]:
                    c = {k: v for k, v in block.items() if k != "sites"}
                    c.update(grid=g, seed=seed, layer=layer, position=pos)
                    out.append(c)
    return out


def group_key(c):
    """Configs that one road run can serve (same task, variable, kind, hyper-parameters, seed)."""
    keys = ["task", "variable", "spec", "kind", "rank", "steps", "batch", "lr", "boundary_lr", "temperature",
            "penalty", "seed"] + (["selection"] if "selection" in c else [])
    return json.dumps({k: c.get(k) for k in keys}, sort_keys=True)


def cfg_key(c):
    return group_key(c) + f"|L{c['layer']}@{c['position']}"


def road_sets(c, orthonormal=None):
    s = [f"seed={c['seed']}", f"task.name=\"{c['task']}\"", f"task.variable=\"{c['variable']}\"",
         f"train.steps={c['steps']}", f"train.batch={c['batch']}", f"train.lr={c['lr']}",
         "sites.site=\"block_output\""]
    if c["kind"] == "das":
        s.append(f"intervention={{kind=\"das\", rank={c['rank']}}}")
    elif c["kind"] == "road_dii":
        t0, t1 = c["temperature"]
        # key by key (binaries before the whole-table fix lost a table's `rank` to the file's)
        s += ["intervention.kind=\"road_dii\"", "intervention.road_variant=\"road_1\"", "intervention.road_group_size=2",
              f"intervention.road_selection=\"{c['selection']}\"", f"intervention.rank={c['rank'] or 1}",
              f"intervention.temperature=[{t0}, {t1}]", f"intervention.penalty={c['penalty']}"]
        s.append(f"train.boundary_lr={c['boundary_lr']}")
    else:
        t0, t1 = c["temperature"]
        s.append(f"intervention={{kind=\"boundless\", temperature=[{t0}, {t1}], penalty={c['penalty']}}}")
        s.append(f"train.boundary_lr={c['boundary_lr']}")
    if orthonormal:
        s.append(f"train.orthonormal=\"{orthonormal}\"")
    return s


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def append_jsonl(path, obj):
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def read_road_run(run_dir, cells):
    """road's test/train/dev IIA and loss curve per (layer, position) from metrics.csv/train_log.csv."""
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(run_dir, "train_log.csv")) as f:
        log = list(csv.DictReader(f))
    summ = json.load(open(os.path.join(run_dir, "summary.json")))
    # timing.csv: seconds since the cell's training started, per step (the time-to-quality clock)
    clock = {}
    tpath = os.path.join(run_dir, "timing.csv")
    if os.path.exists(tpath):
        with open(tpath) as f:
            for x in csv.DictReader(f):
                if x.get("control", "none") in ("none", ""):
                    clock[(int(x["layer"]), x["position"], int(x["step"]))] = float(x["seconds"])
    out = {}
    for layer, pos in cells:
        r = {"road_run": run_dir, "road_run_seconds": summ.get("seconds"), "road_run_cells": len(cells)}
        for row in rows:
            if int(row["layer"]) == layer and row["position"] == pos and row.get("control", "none") in ("none", ""):
                r[f"road_{row['split']}_iia"] = float(row["iia_vocab"])
                r[f"road_{row['split']}_n"] = int(row["n"])
        # the controls' test IIA beside the trained one's (random_subspace, permuted_labels, random_model)
        r["road_controls"] = {row["control"]: float(row["iia_vocab"]) for row in rows
                              if int(row["layer"]) == layer and row["position"] == pos and row["split"] == "test"
                              and row.get("control", "none") not in ("none", "")}
        curve = [x for x in log if int(x["layer"]) == layer and x["position"] == pos
                 and x.get("control", "none") in ("none", "")]
        r["road_loss_curve"] = [float(x["loss"]) for x in curve]
        if curve:
            r["road_final_loss"] = r["road_loss_curve"][-1]
            r["road_final_loss_mean5"] = statistics.mean(r["road_loss_curve"][-5:])
            if curve[-1].get("seconds") not in (None, "", "NaN"):
                r["road_train_seconds"] = float(curve[-1]["seconds"])
            if "dev_iia" in curve[0]:
                r["road_dev_curve"] = [{"step": int(x["step"]) + 1, "dev_iia": float(x["dev_iia"]),
                                        "train_seconds": clock.get((layer, pos, int(x["step"])))}
                                       for x in curve if x.get("dev_iia") not in (None, "", "NaN")]
                r["road_train_seconds"] = clock.get((layer, pos, int(curve[-1]["step"])))
            if curve[-1].get("subspace_dims") not in (None, "", "NaN"):
                r["road_final_dims"] = float(curve[-1]["subspace_dims"])
            if curve[-1].get("beta") not in (None, "", "NaN"):
                r["road_final_beta"] = float(curve[-1]["beta"])
        out[(layer, pos)] = r
    return out


def latest_run(out_root, name, before):
    d = os.path.join(out_root, name)
    runs = [os.path.join(d, x) for x in os.listdir(d)] if os.path.isdir(d) else []
    runs = [r for r in runs if r not in before]
    if not runs:
        return None
    return max(runs, key=os.path.getmtime)


def phase_road(cfgs, args):
    done = {r["key"] for r in read_jsonl(os.path.join(args.work, "road.jsonl"))}
    variants = [(None, "road")] + ([("euclidean", "road_old")] if args.road_old else [])
    groups = {}
    for c in cfgs:
        groups.setdefault(group_key(c), []).append(c)
    for gk, cs in groups.items():
        # one road run per position (multi) or per site (single)
        if args.road_cells == "multi":
            by_pos = {}
            for c in cs:
                by_pos.setdefault(c["position"], []).append(c)
            runs = list(by_pos.values())
        else:
            runs = [[c] for c in cs]
        for orth, tag in variants:
            for run in runs:
                todo = [c for c in run if f"{tag}|{cfg_key(c)}" not in done]
                if not todo:
                    continue
                c0 = todo[0]
                layers = sorted({c["layer"] for c in todo})
                pos = c0["position"]
                sets = road_sets(c0, orth) + [f"sites.layers={json.dumps(layers)}", f"sites.positions=[\"{pos}\"]",
                                              f"name=\"sbs-{c0['task']}-{c0['variable']}\""]
                name = f"sbs-{c0['task']}-{c0['variable']}"
                out_root = os.path.join(args.work, "road-out")
                os.makedirs(out_root, exist_ok=True)
                before = set(os.path.join(out_root, name, x) for x in os.listdir(os.path.join(out_root, name))) \
                    if os.path.isdir(os.path.join(out_root, name)) else set()
                if args.road_model:
                    sets.append(f"model.name={json.dumps(args.road_model)}")
                cmd = ["nice", "-n", str(args.nice), args.road] + args.road_global.split() + ["run", c0["spec"]]
                for s in sets:
                    cmd += ["--set", s]
                env = dict(os.environ, ROAD_OUT=out_root)
                shown = " ".join(f"'{x}'" if any(ch in x for ch in " \"[{") else x for x in cmd)
                print(f"[road] ROAD_OUT={out_root} {shown}", file=sys.stderr, flush=True)
                t = time.perf_counter()
                p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t
                with open(os.path.join(args.work, "road-commands.log"), "a") as f:
                    f.write(f"ROAD_OUT={out_root} {shown}\n# rc={p.returncode} {wall:.1f}s\n")
                if p.returncode != 0:
                    print(p.stdout[-2000:], p.stderr[-4000:], file=sys.stderr)
                    print(f"[road] FAILED rc={p.returncode}; skipping this run", file=sys.stderr)
                    continue
                run_dir = latest_run(out_root, name, before)
                res = read_road_run(run_dir, [(c["layer"], c["position"]) for c in todo])
                for c in todo:
                    r = res[(c["layer"], c["position"])]
                    if tag != "road":
                        r = {k.replace("road_", f"{tag}_", 1): v for k, v in r.items()}
                    row = {"key": f"{tag}|{cfg_key(c)}", "cfg": c, "tag": tag, "wall_seconds": wall, "cmd": shown, **r}
                    append_jsonl(os.path.join(args.work, "road.jsonl"), row)
                    print(f"[road] {tag} {c['variable']} {c['kind']} r{c['rank']} L{c['layer']}@{c['position']} "
                          f"seed {c['seed']}: test {r.get(tag + '_test_iia')} train {r.get(tag + '_train_iia')} "
                          f"loss {r.get(tag + '_final_loss')}", file=sys.stderr, flush=True)


def phase_pyvene(cfgs, args):
    import pyvene_iia as P
    road = {r["key"]: r for r in read_jsonl(os.path.join(args.work, "road.jsonl"))}
    done = {r["key"] for r in read_jsonl(os.path.join(args.work, "pyvene.jsonl"))}
    # pyvene has DAS and Boundless DAS; RoAd-DII configs are road-only
    todo = [c for c in cfgs if cfg_key(c) not in done and f"road|{cfg_key(c)}" in road
            and c["kind"] in ("das", "boundless")]
    if not todo:
        return
    t = time.perf_counter()
    M = P.load_model(args.model, args.threads, args.device)
    print(f"[pyvene] model loaded in {time.perf_counter() - t:.1f}s on {args.device}", file=sys.stderr, flush=True)
    cache = {}
    for c in todo:
        run_dir = road[f"road|{cfg_key(c)}"]["road_run"]
        if args.pairs_root:
            old, new = args.pairs_root.split("=", 1)
            run_dir = run_dir.replace(old, new, 1)
        if run_dir not in cache:
            cache[run_dir] = P.read_pairs(run_dir)
        pairs = cache[run_dir]
        res = P.train_eval(M, pairs, c["layer"], c["position"], c["kind"], c["rank"] or 0, c["steps"], c["batch"],
                           c["lr"], c.get("boundary_lr") or 1e-2, tuple(c.get("temperature") or (50.0, 0.1)),
                           c.get("penalty") or 1.0, c["seed"], args.eval_every,
                           log=lambda m: print(m, file=sys.stderr))
        res.update(key=cfg_key(c), cfg=c, device=args.device, pairs=run_dir)
        append_jsonl(os.path.join(args.work, "pyvene.jsonl"), res)
        print(f"[pyvene] {c['variable']} {c['kind']} r{c['rank']} L{c['layer']}@{c['position']} seed {c['seed']}: "
              f"test {res['test_iia']:.3f} train {res['train_iia']:.3f} loss {res['loss_first']:.2f} -> "
              f"{res['final_loss']:.2f} ({res['train_seconds']:.1f}s, {res['examples_per_s']:.0f} ex/s)",
              file=sys.stderr, flush=True)


def time_to(curve, target, tkey):
    for p in curve or []:
        if p["dev_iia"] >= target - 1e-9:
            return p.get(tkey)
    return None


COLS = ["grid", "task", "variable", "kind", "rank", "layer", "position", "seed", "steps", "batch", "lr",
        "road_test_iia", "pyvene_test_iia", "road_train_iia", "pyvene_train_iia", "road_dev_iia", "pyvene_dev_iia",
        "test_n", "train_n", "road_final_loss", "pyvene_final_loss", "road_final_loss_mean5",
        "pyvene_final_loss_mean5", "road_old_test_iia", "road_old_train_iia", "road_old_final_loss",
        "road_final_beta", "pyvene_final_beta", "road_run_seconds", "road_run_cells", "pyvene_train_seconds",
        "pyvene_examples_per_s", "pyvene_device", "pyvene_seconds_to_final_dev_iia", "road_train_seconds",
        "road_seconds_to_pyvene_dev_iia", "road_final_dims", "road_run",
        "road_loss_curve", "pyvene_loss_curve", "pyvene_dev_curve"]


def phase_table(cfgs, args):
    road = {r["key"]: r for r in read_jsonl(os.path.join(args.work, "road.jsonl"))}
    pv = {r["key"]: r for r in read_jsonl(os.path.join(args.work, "pyvene.jsonl"))}
    rows = []
    for c in cfgs:
        k = cfg_key(c)
        r, o, p = road.get(f"road|{k}"), road.get(f"road_old|{k}"), pv.get(k)
        if not r and not p:
            continue
        row = {x: c.get(x) for x in ("grid", "task", "variable", "kind", "rank", "layer", "position", "seed",
                                     "steps", "batch", "lr")}
        if r:
            for x in ("road_test_iia", "road_train_iia", "road_dev_iia", "road_final_loss", "road_final_loss_mean5",
                      "road_final_beta", "road_final_dims", "road_run_seconds", "road_run_cells", "road_run"):
                row[x] = r.get(x)
            row["test_n"], row["train_n"] = r.get("road_test_n"), r.get("road_train_n")
            row["road_loss_curve"] = " ".join(f"{v:.3f}" for v in r.get("road_loss_curve", []))
        if o:
            for x in ("road_old_test_iia", "road_old_train_iia", "road_old_final_loss"):
                row[x] = o.get(x)
        if p:
            row.update(pyvene_test_iia=p["test_iia"], pyvene_train_iia=p["train_iia"], pyvene_dev_iia=p["dev_iia"],
                       pyvene_final_loss=p["final_loss"], pyvene_final_loss_mean5=p["final_loss_mean5"],
                       pyvene_final_beta=p.get("final_beta"), pyvene_train_seconds=p["train_seconds"],
                       pyvene_examples_per_s=p["examples_per_s"], pyvene_device=p.get("device"),
                       pyvene_seconds_to_final_dev_iia=time_to(p["dev_curve"], p["dev_iia"], "train_seconds"),
                       road_seconds_to_pyvene_dev_iia=time_to(r.get("road_dev_curve") if r else None, p["dev_iia"],
                                                              "train_seconds"),
                       road_train_seconds=r.get("road_train_seconds") if r else None,
                       pyvene_loss_curve=" ".join(f"{v:.3f}" for v in p["loss_curve"]),
                       pyvene_dev_curve=" ".join(f"{d['step']}:{d['dev_iia']:.3f}@{d['train_seconds']:.1f}s"
                                                 for d in p["dev_curve"]))
            if row.get("test_n") is None:
                row["test_n"], row["train_n"] = p["test_n"], p["train_n"]
        rows.append(row)
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    print(f"wrote {len(rows)} rows to {args.csv}", file=sys.stderr)

    def f3(v):
        return "–" if v is None else f"{v:.3f}"
    old = any(r.get("road_old_test_iia") is not None for r in rows)
    print("\n| grid | variable | kind | rank | site | seed | road test (train) | pyvene test (train) | Δ test | "
          "road loss | pyvene loss |" + (" road old-opt test |" if old else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if old else ""))
    for r in rows:
        d = None if r.get("road_test_iia") is None or r.get("pyvene_test_iia") is None else r["road_test_iia"] - r["pyvene_test_iia"]
        print(f"| {r['grid']} | {r['variable']} | {r['kind']} | {r['rank'] or ''} | {r['position']}@L{r['layer']} | {r['seed']} | "
              f"{f3(r.get('road_test_iia'))} ({f3(r.get('road_train_iia'))}) | {f3(r.get('pyvene_test_iia'))} "
              f"({f3(r.get('pyvene_train_iia'))}) | {'–' if d is None else f'{d:+.3f}'} | "
              f"{f3(r.get('road_final_loss_mean5'))} | {f3(r.get('pyvene_final_loss_mean5'))} |"
              + (f" {f3(r.get('road_old_test_iia'))} |" if old else ""))
    # means over seeds
    agg = {}
    for r in rows:
        agg.setdefault((r["grid"], r["variable"], r["kind"], r["rank"], r["layer"], r["position"]), []).append(r)
    print("\n| grid | variable | kind | rank | site | seeds | road test | pyvene test | Δ | road train | pyvene train |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def mean(rs, k):
        v = [x[k] for x in rs if x.get(k) is not None]
        return statistics.mean(v) if v else None
    allpairs = []
    for (g, v, kd, rk, L, pos), rs in agg.items():
        rt, pt = mean(rs, "road_test_iia"), mean(rs, "pyvene_test_iia")
        both = [x for x in rs if x.get("road_test_iia") is not None and x.get("pyvene_test_iia") is not None]
        allpairs += both
        d = None if rt is None or pt is None else rt - pt
        print(f"| {g} | {v} | {kd} | {rk or ''} | {pos}@L{L} | {len(rs)} | {f3(rt)} | {f3(pt)} | "
              f"{'–' if d is None else f'{d:+.3f}'} | {f3(mean(rs, 'road_train_iia'))} | {f3(mean(rs, 'pyvene_train_iia'))} |")
    if allpairs:
        d = statistics.mean(x["road_test_iia"] - x["pyvene_test_iia"] for x in allpairs)
        print(f"\nmean Δ test IIA (road − pyvene) over {len(allpairs)} configs: {d:+.3f}")


def phase_roadtable(cfgs, args):
    """road-only comparison (RoAd-DII against DAS of several ranks): means over seeds per
    (kind, selection, rank, site) of test IIA, learned subspace size, random-subspace control and
    training seconds, from WORK/road.jsonl; CSV to --csv."""
    road = {r["key"]: r for r in read_jsonl(os.path.join(args.work, "road.jsonl"))}
    agg = {}
    for c in cfgs:
        r = road.get(f"road|{cfg_key(c)}")
        if r:
            agg.setdefault((c["kind"], c.get("selection", ""), c["rank"], c["layer"], c["position"]), []).append(r)
    out = []
    for (kind, sel, rank, layer, pos), rs in sorted(agg.items(), key=lambda kv: (kv[0][3], kv[0][4], kv[0][0], kv[0][1],
                                                                                kv[0][2] or 0)):
        def m(f):
            v = [f(x) for x in rs]
            v = [x for x in v if x is not None]
            return statistics.mean(v) if v else None
        out.append(dict(kind=kind, selection=sel, rank=rank or "", layer=layer, position=pos, seeds=len(rs),
                        test_iia=m(lambda x: x.get("road_test_iia")), train_iia=m(lambda x: x.get("road_train_iia")),
                        test_iia_min=min(x["road_test_iia"] for x in rs), test_iia_max=max(x["road_test_iia"] for x in rs),
                        dims=m(lambda x: x.get("road_final_dims")) if kind == "road_dii" else (rank or ""),
                        random_subspace=m(lambda x: (x.get("road_controls") or {}).get("random_subspace")),
                        train_seconds=m(lambda x: x.get("road_train_seconds"))))
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out[0].keys()))
        w.writeheader()
        w.writerows(out)
    print("| site | kind | selection | rank / learned dims | seeds | test IIA (min–max) | train IIA | random subspace | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    f3 = lambda v: "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    for o in out:
        print(f"| {o['position']}@L{o['layer']} | {o['kind']} | {o['selection']} | {f3(o['dims'])} | {o['seeds']} | "
              f"{f3(o['test_iia'])} ({o['test_iia_min']:.2f}–{o['test_iia_max']:.2f}) | {f3(o['train_iia'])} | "
              f"{f3(o['random_subspace'])} | {f3(o['train_seconds'])} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="a", help="comma list of grids (a,b,c,d,e)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--phase", default="all", choices=["all", "road", "pyvene", "table", "roadtable"])
    ap.add_argument("--road", default="/tmp/h3/road", help="road binary (a copy, not target/release)")
    ap.add_argument("--road-cells", default="multi", choices=["multi", "single"])
    ap.add_argument("--road-global", default="", help="road's global flags, e.g. '--device cuda'")
    ap.add_argument("--road-model", default=None, help="model path for road (model.name), e.g. on the GPU machine")
    ap.add_argument("--road-old", action="store_true", help="also road with train.orthonormal=euclidean (the old optimiser)")
    ap.add_argument("--work", default="/tmp/h3/sbs")
    ap.add_argument("--csv", default=os.path.join(REPO, "docs/results/das-vs-pyvene.csv"))
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="/root/.cache/road-dii/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--pairs-root", default=None, help="OLD=NEW: rewrite road run folder paths (pyvene elsewhere)")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    cfgs = configs(args.grid.split(","), [int(s) for s in args.seeds.split(",")])
    if args.phase in ("all", "road"):
        phase_road(cfgs, args)
    if args.phase in ("all", "pyvene"):
        phase_pyvene(cfgs, args)
    if args.phase in ("all", "table"):
        phase_table(cfgs, args)
    if args.phase == "roadtable":
        phase_roadtable(cfgs, args)


if __name__ == "__main__":
    main()
