#!/usr/bin/env python3
"""PyTorch + transformers baseline for `road bench forward`: SmolLM2-135M-Instruct (GGUF Q4_1
dequantised) or a randomly initialised LLaMA-shaped model, on CPU or CUDA, f32/bf16/f16.

Same workload as road: prefill of BxT pseudo-text ids with logits at every position (median of
--reps after a warm-up), then greedy decode with a KV cache, batch 1.

Usage (CPU): python bench_torch.py [--threads 2] [--reps 5]
Usage (GPU): python bench_torch.py --device cuda --dtype bf16 --random-config 7b --attn sdpa
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL = "/root/.cache/road-dii/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152


def token_ids(rows, seq, vocab=VOCAB):
    return [[(r * 7919 + i * 104729 + 17) % (vocab - 100) + 50 for i in range(seq)] for r in range(rows)]


# Same shapes as road's `--random-config` presets (src/model/random.rs).
PRESETS = {
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, head_dim=128, rope_theta=10000.0,
               tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
               tie_word_embeddings=True),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                    tie_word_embeddings=True),
}


def torch_setup(device, dtype_name, threads):
    """Thread count, device and dtype for a harness, and a `sync()` that waits for the GPU (so
    timed regions end when the work does). Shared by bench_pyvene.py and bench_peft_batching.py."""
    import torch
    torch.set_num_threads(threads)
    dev = torch.device(device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype_name]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return dev, dtype, sync


def load_gguf(path, dtype, attn):
    """transformers' GGUF loader (de-quantising) with the requested attention, falling back to
    eager when sdpa is refused. Returns (model on the CPU, attention used)."""
    from transformers import AutoModelForCausalLM
    mdir, mfile = os.path.split(os.path.abspath(path))
    try:
        return AutoModelForCausalLM.from_pretrained(mdir, gguf_file=mfile, dtype=dtype, attn_implementation=attn), attn
    except Exception as e:
        if attn == "eager":
            raise
        print(f"sdpa load failed ({type(e).__name__}: {e}); falling back to eager", file=sys.stderr)
        return AutoModelForCausalLM.from_pretrained(mdir, gguf_file=mfile, dtype=dtype, attn_implementation="eager"), "eager"


def random_model(name, dtype, dev, attn):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**PRESETS[name], rms_norm_eps=1e-5, max_position_embeddings=4096,
                      attn_implementation=attn)
    # Built directly on the device in the target dtype (init N(0, 0.02) like road's).
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(old)
    n = sum(p.numel() for p in model.parameters())
    print(f"random-init {name}: {n} parameters, attention {model.config._attn_implementation}")
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--random-config", default=None, choices=[None, "7b", "1b", "smollm2"],
                    help="random-init model of this shape (as `road bench forward --random-config`)")
    ap.add_argument("--shapes", default="1x32,16x32", help="prefill shapes BxT, comma-separated")
    args = ap.parse_args()

    import torch
    import transformers

    dev, dtype, sync = torch_setup(args.device, args.dtype, args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, reps {args.reps}, device {dev}, dtype {dtype}")

    t0 = time.perf_counter()
    attn = args.attn
    if args.random_config:
        model = random_model(args.random_config, dtype, dev, attn)
    else:
        model, attn = load_gguf(args.model, dtype, attn)
        model = model.to(dev)
    model.eval()
    sync()
    used_attn = getattr(model.config, "_attn_implementation", attn)
    print(f"attention implementation: {used_attn}; dtype {next(model.parameters()).dtype}; "
          f"load {time.perf_counter() - t0:.1f}s")

    if dev.type == "cuda":  # the GPU's measured matmul rate, for model FLOP utilisation
        a, b = (torch.randn(8192, 8192, device=dev, dtype=dtype) for _ in range(2))
        a @ b
        sync()
        best = float("inf")
        for _ in range(10):
            t = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t)
        print(f"torch {dtype} matmul 8192^3: {2 * 8192 ** 3 / best / 1e12:.1f} TFLOP/s")
        del a, b

    with torch.inference_mode():
        # --- correctness check ---
        if not args.random_config:
            out = model(torch.tensor([[504, 3575, 282, 4649, 314]], device=dev))
            last = out.logits[0, -1].float()
            top = int(torch.argmax(last))
            val = float(last[top])
            ok = top == 7042 and abs(val - 17.371) < 0.05
            print(f"check: top id {top} logit {val:.3f} (expect 7042 ~17.371) -> {'OK' if ok else 'MISMATCH'}")

        # --- prefill ---
        vocab = model.config.vocab_size
        for shape in args.shapes.split(","):
            rows, seq = (int(x) for x in shape.split("x"))
            ids = torch.tensor(token_ids(rows, seq, vocab), dtype=torch.long, device=dev)
            model(ids)  # warm-up
            sync()
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                logits = model(ids).logits  # logits at all positions (default)
                sync()
                times.append(time.perf_counter() - t)
            assert logits.shape[:2] == (rows, seq)
            med = statistics.median(times)
            print(f"torch prefill {rows:2d}x{seq}: {rows * seq / med:.1f} tokens/s  ({med * 1e3:.2f} ms per batch)")

        # --- greedy decode with KV cache (manual loop) ---
        n_new = args.decode_tokens
        prompt = torch.tensor(token_ids(1, 8, vocab), dtype=torch.long, device=dev)

        # transformers >= 5.2x renamed past_key_values -> cache (old name deprecated)
        import inspect
        new_api = "cache" in inspect.signature(model.forward).parameters
        kv_kw = "cache" if new_api else "past_key_values"
        print(f"kv cache kwarg: {kv_kw}")

        def get_kv(o):
            return o.cache if new_api else o.past_key_values

        def decode_once():
            out = model(prompt, use_cache=True)
            past = get_kv(out)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # token 1 of n_new
            gen = [int(nxt)]
            sync()
            t = time.perf_counter()
            for _ in range(n_new - 1):  # tokens 2..n_new
                out = model(nxt, use_cache=True, **{kv_kw: past})
                past = get_kv(out)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                gen.append(int(nxt))
            return time.perf_counter() - t, gen

        decode_once()  # warm-up
        times = []
        for _ in range(args.reps):
            dt, gen = decode_once()
            times.append(dt)
        med = statistics.median(times)
        print(f"torch greedy decode: {(n_new - 1) / med:.1f} tokens/s")
        print(f"decode first tokens: {gen[:8]}")


if __name__ == "__main__":
    main()
