#!/usr/bin/env python3
"""pyvene baseline for road-dii: IOI activation patching sweep + rank-1 DAS on SmolLM2-135M-Instruct
(GGUF Q4_1 dequantised), on CPU or CUDA (--device cuda, --dtype f32|bf16).

Usage:
  /tmp/torchbench/venv/bin/python /tmp/torchbench/bench_pyvene.py [--workload both|patching|das]
      [--threads 2] [--pairs 48] [--batch 48] [--layers N|a,b,c] [--layer 20] [--steps 50]
      [--full-logits]

--layers: an integer N = first N layers (default: all 30); a comma list = exactly those layers.
By default the LM head is evaluated only at the last position (logits_to_keep=1, passed through
pyvene to the HF forward for both base and source runs); --full-logits computes all positions.
"""
import argparse
import itertools
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL = "/root/.cache/road-dii/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
NAMES = [" Mary", " John", " Tom", " James", " Anna", " Paul", " Kate", " Mark",
         " Sarah", " David", " Lisa", " Peter"]
TEMPLATE = "When{X} and{Y} went to the store,{Z} gave a drink to"
DAS_BATCH = 16


def make_pairs(n):
    # deterministic: ordered (A, B), A != B, in itertools.permutations order over NAMES
    perms = list(itertools.permutations(NAMES, 2))
    if n > len(perms):
        sys.exit(f"--pairs {n} > {len(perms)} available ordered name pairs")
    return perms[:n]


def encode(tok, texts):
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(x) for x in ids}) == 1, "prompts must tokenise to equal length"
    return ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="both", choices=["both", "patching", "das"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--layers", default=None)
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--das-pairs", type=int, default=132, help="pair pool cycled by DAS batches")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up cells / steps")
    ap.add_argument("--full-logits", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoTokenizer
    import pyvene as pv
    from bench_torch import load_gguf, torch_setup

    dev, dtype, sync = torch_setup(args.device, args.dtype, args.threads)
    torch.manual_seed(0)

    def place(iv):
        # interventions are built on the CPU in f32; move them next to the model
        iv.set_device(dev)
        for v in iv.interventions.values():
            (v[0] if isinstance(v, tuple) else v).to(device=dev, dtype=dtype)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"pyvene {getattr(pv, '__version__', None) or _dist_version('pyvene')}, threads {torch.get_num_threads()}")

    mdir, mfile = os.path.split(os.path.abspath(args.model))
    t0 = time.perf_counter()
    model, _ = load_gguf(args.model, dtype, args.attn)
    tok = AutoTokenizer.from_pretrained(mdir, gguf_file=mfile)
    model = model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n_layers = model.config.num_hidden_layers
    print(f"model {type(model).__name__}, {n_layers} layers, attention {model.config._attn_implementation}, "
          f"load {time.perf_counter() - t0:.1f}s")

    # pyvene 0.1.8 keys its model-type tables by class; make sure this class is registered (it is in
    # 0.1.8, which imports transformers.models.llama.modeling_llama.LlamaForCausalLM); if a future
    # transformers ever gives a different class object, register it with pyvene's own llama LM mapping.
    from pyvene.models import intervenable_modelcard as mc
    if type(model) not in mc.type_to_module_mapping:
        from pyvene.models.llama import modelings_intervenable_llama as pl
        mc.type_to_module_mapping[type(model)] = pl.llama_lm_type_to_module_mapping
        mc.type_to_dimension_mapping[type(model)] = pl.llama_lm_type_to_dimension_mapping
        print("note: registered", type(model), "in pyvene type mappings (llama LM mapping)")

    extra = {} if args.full_logits else {"logits_to_keep": 1}

    def inputs(ids):
        return {"input_ids": torch.tensor(ids, dtype=torch.long, device=dev), **extra}

    # ---------------- (a) activation patching sweep ----------------
    if args.workload in ("both", "patching"):
        pairs = make_pairs(args.pairs)
        base_ids = encode(tok, [TEMPLATE.format(X=a, Y=b, Z=b) for a, b in pairs])  # ABB
        src_ids = encode(tok, [TEMPLATE.format(X=a, Y=b, Z=a) for a, b in pairs])   # ABA
        seq = len(base_ids[0])
        io_tok = torch.tensor([tok(a, add_special_tokens=False)["input_ids"][0] for a, _ in pairs], device=dev)
        s_tok = torch.tensor([tok(b, add_special_tokens=False)["input_ids"][0] for _, b in pairs], device=dev)
        if args.layers is None:
            layers = list(range(n_layers))
        elif "," in args.layers:
            layers = [int(x) for x in args.layers.split(",")]
        else:
            layers = list(range(int(args.layers)))
        # one IntervenableModel per layer, built outside the timed region (construction is ~ms)
        ivs = {}
        for L in layers:
            cfg = pv.IntervenableConfig(
                representations=[pv.RepresentationConfig(L, "block_output", "pos", 1)],
                intervention_types=pv.VanillaIntervention)
            ivs[L] = pv.IntervenableModel(cfg, model)
            ivs[L].disable_model_gradients()
            place(ivs[L])
        batches = [(i, min(i + args.batch, len(pairs))) for i in range(0, len(pairs), args.batch)]
        base_b = [inputs(base_ids[i:j]) for i, j in batches]
        src_b = [inputs(src_ids[i:j]) for i, j in batches]

        def cell(L, pos):
            outs = []
            for (i, j), b, s in zip(batches, base_b, src_b):
                n = j - i
                loc = [[[pos]] * n]
                _, cf = ivs[L](b, [s], unit_locations={"sources->base": (loc, loc)})
                last = cf.logits[:, -1, :].float()  # last-position logits
                outs.append(last.gather(1, io_tok[i:j, None]) - last.gather(1, s_tok[i:j, None]))
            return torch.cat(outs).mean().item()  # logit diff IO - S

        with torch.no_grad():
            for _ in range(args.warmup):
                cell(layers[0], seq - 1)
            sync()
            t = time.perf_counter()
            results = {}
            for L in layers:
                for pos in range(seq):
                    results[(L, pos)] = cell(L, pos)
            dt = time.perf_counter() - t
        cells = len(layers) * seq
        # sanity: patching the last layer at the last position makes base output the source's
        if (n_layers - 1) in ivs:
            print(f"sanity: logit diff after patch L{n_layers - 1}/pos{seq - 1} = {results[(n_layers - 1, seq - 1)]:.3f}")
        print(f"patching: {len(layers)} layers x {seq} positions = {cells} cells, {len(pairs)} pairs, "
              f"batch {args.batch}, {dt:.2f}s; logit diff range "
              f"[{min(results.values()):.3f}, {max(results.values()):.3f}]")
        print(f"pyvene patching: {cells / dt:.3f} cells/s, {cells * len(pairs) / dt:.2f} examples/s")

    # ---------------- (b) rank-1 DAS ----------------
    if args.workload in ("both", "das"):
        pool = make_pairs(args.das_pairs)
        base_ids = encode(tok, [TEMPLATE.format(X=a, Y=b, Z=b) for a, b in pool])  # ABB
        src_ids = encode(tok, [TEMPLATE.format(X=b, Y=a, Z=b) for a, b in pool])   # BAB
        labels = torch.tensor([tok(b, add_special_tokens=False)["input_ids"][0] for _, b in pool], device=dev)  # base S = B
        seq = len(base_ids[0])
        cfg = pv.IntervenableConfig(
            representations=[pv.RepresentationConfig(args.layer, "block_output", "pos", 1,
                                                     low_rank_dimension=1)],
            intervention_types=pv.LowRankRotatedSpaceIntervention)
        iv = pv.IntervenableModel(cfg, model)
        iv.disable_model_gradients()
        place(iv)
        params = [p for p in iv.get_trainable_parameters() if p.requires_grad] \
            if hasattr(iv, "get_trainable_parameters") else \
            [p for v in iv.interventions.values() for p in (v[0] if isinstance(v, tuple) else v).parameters()]
        n_params = sum(p.numel() for p in params)
        opt = torch.optim.Adam(params, lr=args.lr)
        loc = [[[seq - 1]] * DAS_BATCH]
        n = len(pool)

        def step(k):
            idx = [(k * DAS_BATCH + r) % n for r in range(DAS_BATCH)]
            b = inputs([base_ids[i] for i in idx])
            s = inputs([src_ids[i] for i in idx])
            _, cf = iv(b, [s], unit_locations={"sources->base": (loc, loc)})
            loss = torch.nn.functional.cross_entropy(cf.logits[:, -1, :].float(), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        for k in range(args.warmup):
            step(k)
        sync()
        t = time.perf_counter()
        losses = [step(args.warmup + k) for k in range(args.steps)]
        dt = time.perf_counter() - t
        print(f"das: layer {args.layer}, pos {seq - 1}, rank 1, {n_params} trainable params, lr {args.lr}, "
              f"{dt:.2f}s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        print(f"pyvene das: {args.steps * DAS_BATCH / dt:.2f} examples/s ({args.steps} steps x batch {DAS_BATCH})")


def _dist_version(name):
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    main()
