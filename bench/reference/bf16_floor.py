#!/usr/bin/env python3
"""bf16 vs f32 last-position logits study for SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised by transformers).
Each variant starts from the f32 model and emulates bf16 by rounding (x.bfloat16().float()) chosen tensors,
except A which is PyTorch's real bf16 forward (model.to(torch.bfloat16)).
How far from f32 can a forward with bf16 weights get? (BENCHMARKS.md, GPU parity; output kept in
docs/results/bf16-floor.txt.) CPU only, 2 threads, ~70 s.
Run: python bench/reference/bf16_floor.py [MODEL_DIR [REFERENCE_DIR]] > out.txt
  MODEL_DIR: folder with SmolLM2-135M-Instruct.Q4_1.gguf (default: road's cache)
  REFERENCE_DIR: shared/reference (public.json, public.safetensors)
"""
import os, json, time, copy
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import torch, torch.nn as nn
import transformers.models.llama.modeling_llama as ML
from transformers import AutoModelForCausalLM
from safetensors import safe_open

torch.set_num_threads(2)
import sys
MDIR = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/road-dii/models/smollm2-135m")
MFILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REFDIR = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "../../../shared/reference")
pub = json.load(open(f"{REFDIR}/public.json"))
PROMPTS = [p["ids"] for p in pub["prompts"]]
REF = safe_open(f"{REFDIR}/public.safetensors", "pt")

def bf(t): return t.to(torch.bfloat16).to(t.dtype)

t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(MDIR, gguf_file=MFILE, dtype=torch.float32, attn_implementation="eager").eval()
tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
# untie so lm_head and embedding can be rounded independently (values identical)
model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
ORIG = {k: v.detach().clone() for k, v in model.state_dict().items()}
print(f"loaded in {time.time()-t0:.1f}s; tied={tied}; layers={model.config.num_hidden_layers}")

# fraction of weights already exactly bf16-representable (Q4_1 dequant d*q+m is generally not)
lin_w = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
exact = sum((w == bf(w)).sum().item() for w in lin_w) / sum(w.numel() for w in lin_w)
relw = max(((w - bf(w)).abs() / w.abs().clamp_min(1e-30)).max().item() for w in lin_w)
print(f"Linear weights exactly bf16-representable: {exact*100:.2f}%  (max rel rounding err {relw:.2e})")

ORIG_ATTN = ML.eager_attention_forward
def make_attn(qk=False, probs=False, v=False, scores=False):
    def attn(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        if qk: query, key = bf(query), bf(key)
        if v: value = bf(value)
        ks = ML.repeat_kv(key, module.num_key_value_groups); vs = ML.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, ks.transpose(2, 3)) * scaling
        if scores: w = bf(w)
        if attention_mask is not None: w = w + attention_mask
        w = nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        if probs: w = bf(w)
        o = torch.matmul(w, vs).transpose(1, 2).contiguous()
        return o, w
    return attn

def linears(which):
    dec = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers")]
    return {"all": dec + [model.lm_head], "dec": dec, "head": [model.lm_head],
            "attn": [m for m in dec if m.__class__ is nn.Linear and any(s in n for s in [])]}[which] if which != "attn" and which != "mlp" else \
        [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers") and (".self_attn." in n) == (which == "attn")]

def in_hook(mod, args): return (bf(args[0]),) + tuple(args[1:])
def out_hook(mod, args, out): return bf(out)
def layer_out_hook(mod, args, out):
    return (bf(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else bf(out)

def setup(cfg):
    """cfg keys: w (set of linears: all/dec/head), win, wout (linear sets for input/output rounding),
    emb, normw, resid (round residual stream after each decoder layer), attn (dict for make_attn)."""
    model.load_state_dict(ORIG); ML.eager_attention_forward = ORIG_ATTN
    hooks = []
    with torch.no_grad():
        for m in linears(cfg["w"]) if cfg.get("w") else []: m.weight.copy_(bf(m.weight))
        # hi+lo split: W ~= bf16(W) + bf16(W - bf16(W)), i.e. two bf16 weight tensors / two bf16 GEMMs
        for m in linears(cfg["wsplit"]) if cfg.get("wsplit") else []:
            hi = bf(m.weight); m.weight.copy_(hi + bf(m.weight - hi))
        if cfg.get("emb"): model.model.embed_tokens.weight.copy_(bf(model.model.embed_tokens.weight))
        if cfg.get("normw"):
            for n, m in model.named_modules():
                if isinstance(m, ML.LlamaRMSNorm): m.weight.copy_(bf(m.weight))
    for m in linears(cfg["win"]) if cfg.get("win") else []: hooks.append(m.register_forward_pre_hook(in_hook))
    for m in linears(cfg["wout"]) if cfg.get("wout") else []: hooks.append(m.register_forward_hook(out_hook))
    if cfg.get("resid"):
        for l in model.model.layers: hooks.append(l.register_forward_hook(layer_out_hook))
        hooks.append(model.model.embed_tokens.register_forward_hook(out_hook))
    if cfg.get("attn"): ML.eager_attention_forward = make_attn(**cfg["attn"])
    return hooks

@torch.no_grad()
def run(m, dtype=torch.float32):
    outs = []
    for ids in PROMPTS:
        outs.append(m(torch.tensor([ids])).logits[0, -1].float())
    return outs

# f32 baseline
setup({}); F32 = run(model)
print("\nf32 baseline vs public.safetensors reference:")
for i, l in enumerate(F32):
    r = REF.get_tensor(f"p{i}.last_logits").float()
    print(f"  p{i}: T={len(PROMPTS[i]):2d} max|logit|={l.abs().max():6.2f} std={l.std():5.2f} argmax={l.argmax().item():5d} "
          f"maxabs vs ref={ (l-r).abs().max():.2e}  top1-top2 gap={(l.topk(2).values[0]-l.topk(2).values[1]):.3f}")

ALLB = dict(w="all", emb=True)
VARIANTS = [
    ("A  torch model.to(bf16)", None),
    ("B  Linear W bf16 (incl lm_head)", dict(w="all")),
    ("B1 only decoder Linear W bf16", dict(w="dec")),
    ("B2 only lm_head W bf16", dict(w="head")),
    ("C  B + Linear inputs bf16", dict(w="all", win="all")),
    ("C1 C, lm_head input f32 (W bf16)", dict(w="all", win="dec")),
    ("C2 only lm_head W+in bf16", dict(w="head", win="head")),
    ("C3 C + emb bf16 (all storage bf16)", dict(w="all", win="all", emb=True)),
    ("C4 C3 + norm weights bf16", dict(w="all", win="all", emb=True, normw=True)),
    ("C5 C, only attn linears in bf16", dict(w="attn", win="attn")),
    ("C6 C, only mlp linears in bf16", dict(w="mlp", win="mlp")),
    ("D  C + Linear outputs bf16", dict(w="all", win="all", wout="all")),
    ("D1 D but lm_head output f32", dict(w="all", win="all", wout="dec")),
    ("D2 only lm_head out bf16 (f32 W/in)", dict(wout="head")),
    ("E  C with lm_head fully f32", dict(w="dec", win="dec")),
    ("E1 E + emb bf16", dict(w="dec", win="dec", emb=True)),
    ("F  B + emb bf16", dict(w="all", emb=True)),
    ("Ba only attn Linear W bf16", dict(w="attn")),
    ("Bm only mlp Linear W bf16", dict(w="mlp")),
    ("I  only Linear inputs bf16 (W f32)", dict(win="all")),
    ("I1 only decoder Linear inputs bf16", dict(win="dec")),
    ("S1 W hi+lo bf16 pair, f32 inputs", dict(wsplit="all", emb=True)),
    ("S2 S1 + Linear inputs bf16", dict(wsplit="all", emb=True, win="all")),
    ("S3 S1 + dec inputs bf16, head in f32", dict(wsplit="all", emb=True, win="dec")),
    ("G1 C3 + q,k,v bf16 into attn", dict(w="all", win="all", emb=True, attn=dict(qk=True, v=True))),
    ("G2 G1 + softmax probs bf16", dict(w="all", win="all", emb=True, attn=dict(qk=True, v=True, probs=True))),
    ("G3 G2 + scores bf16", dict(w="all", win="all", emb=True, attn=dict(qk=True, v=True, probs=True, scores=True))),
    ("H1 C3 + residual bf16 (f32 lin out)", dict(w="all", win="all", emb=True, resid=True)),
    ("H2 D + emb,normw,resid bf16", dict(w="all", win="all", wout="all", emb=True, normw=True, resid=True)),
    ("H3 H2 + attn all bf16 (~sim of A)", dict(w="all", win="all", wout="all", emb=True, normw=True, resid=True,
                                             attn=dict(qk=True, v=True, probs=True, scores=True))),
]

rows = []
def report(name, outs):
    ma = [(o - f).abs().max().item() for o, f in zip(outs, F32)]
    me = [(o - f).abs().mean().item() for o, f in zip(outs, F32)]
    ag = sum(int(o.argmax() == f.argmax()) for o, f in zip(outs, F32))
    rel = max(m / f.abs().max().item() for m, f in zip(ma, F32))
    line = (f"{name:38s} {min(ma):9.4f} {max(ma):9.4f} {sum(me)/len(me):10.5f} {ag}/{len(F32)}   {rel:8.2e}   "
            + " ".join(f"{m:.3f}" for m in ma) + ("   <=5e-2" if max(ma) <= 5e-2 else ""))
    rows.append(line); print(line, flush=True)

print(f"\n{'variant':38s} {'minMaxAbs':>9s} {'maxMaxAbs':>9s} {'meanMeanAbs':>10s} top1  maxAbs/max|f32|  per-prompt maxabs")
for name, cfg in VARIANTS:
    t = time.time()
    if cfg is None:
        setup({})
        mb = copy.deepcopy(model).to(torch.bfloat16)
        outs = run(mb); del mb
    else:
        hooks = setup(cfg); outs = run(model)
        for h in hooks: h.remove()
    report(name, outs)
ML.eager_attention_forward = ORIG_ATTN
print(f"\nmax|f32 logit| over prompts: {max(f.abs().max().item() for f in F32):.2f}; total time {time.time()-t0:.0f}s")
