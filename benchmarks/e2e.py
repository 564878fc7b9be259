"""End-to-end benchmark (SPEC section 5): EndoRM against Hugging Face naive scoring, side by side in one process.

Contenders score the same token ids (the same examples, tokenized once):
  endokern   EndoRM.score_encoded: length-sorted batches filled to --batch-tokens, backbone hidden states, the
             response rows only through soft_values (no logits), rewards in float64
  hf-naive   the usual Hugging Face scoring loop: padded batches of a fixed number of sequences (also sorted
             by length, which only helps it), model(...).logits over every position, float32 log_softmax,
             gather of the response tokens' log-probabilities; its batch size is the best of --naive-batches,
             picked on a warm-up subset

Both give each example's summed log-probability; the benchmark checks they agree before it reports speed.
Memory: on CPU the growth of the process's peak resident set (VmHWM, reset before each contender; Linux);
on CUDA torch.cuda.max_memory_allocated above what the model holds.

    python benchmarks/e2e.py                                   # CPU: SmolLM2-135M-Instruct, 256 LLMBar pairs
    python benchmarks/e2e.py --device cuda --config qwen2.5-0.5b --examples 1024    # random weights, GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from contenders import device_name, status_bytes  # noqa: E402

from endokern import EndoRM  # noqa: E402
from endokern.assets import DEFAULT_MODEL  # noqa: E402
from endokern.layouts import preference_examples  # noqa: E402
from endokern.tokenization import Encoded, EncodeError  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data"
LLMBAR_SETS = ["Natural", "Adversarial__Neighbor", "Adversarial__GPTInst", "Adversarial__GPTOut", "Adversarial__Manual"]
QWEN_CONFIGS = {  # Qwen2.5 shapes (random weights: speed does not depend on the values)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2),
    # the Qwen2.5 vocabulary on a two-layer body: benchmarks/gpu_check.sh --dry-run runs the GPU steps on a CPU
    "qwen2.5-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2),
}


def llmbar_pairs(rm: EndoRM, data_dir: Path, pairs: int):
    """The first ``pairs`` LLMBar pairs of the five Chat Hard sets, encoded with the model's template."""
    rows = []
    for name in LLMBAR_SETS:
        rows += json.loads((data_dir / "llmbar" / f"LLMBar__{name}.json").read_text())
    encoder = rm.encoder("auto")
    examples = []
    for row in rows[:pairs]:
        examples += preference_examples(row, encoder.template).examples
    encoded = encoder.encode(examples)
    bad = [e for e in encoded if isinstance(e, EncodeError)]
    if bad:
        raise SystemExit(f"{len(bad)} examples could not be encoded: {bad[0]}")
    return encoded


def random_examples(count: int, vocab: int, seed: int = 0):
    """Mixed lengths: prompts of 16..512 tokens, responses of 16..768."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        p, h = int(torch.randint(16, 513, (1,), generator=g)), int(torch.randint(16, 769, (1,), generator=g))
        ids = torch.randint(0, vocab, (p + h,), generator=g).tolist()
        out.append(Encoded(ids[:p], ids[p:]))
    return out


def naive_logprobs(model, encoded, batch_size: int, device) -> list:
    """Hugging Face scoring: logits of every position, float32 log-softmax, gather; summed per response."""
    order = sorted(range(len(encoded)), key=lambda i: -encoded[i].length)
    out = [0.0] * len(encoded)
    pad = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(encoded[i].length for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for b, i in enumerate(idx):
                seq = encoded[i].prompt_ids + encoded[i].response_ids
                ids[b, : len(seq)] = torch.tensor(seq)
                mask[b, : len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            token_lp = logprobs[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            for b, i in enumerate(idx):
                p, t = len(encoded[i].prompt_ids), encoded[i].length
                out[i] = float(token_lp[b, p - 1 : t - 1].double().sum())
            del logits, logprobs, token_lp
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory a block adds: CUDA allocator peak, or the resident set's high-water mark on Linux."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            self.before = status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.before
        else:
            self.extra = max(0, status_bytes("VmHWM") - self.before)


def timed(fn, device):
    with PeakMemory(device) as mem:
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        seconds = time.perf_counter() - start
    return result, seconds, mem.extra


def build(device, *, model=DEFAULT_MODEL, config=None, dtype=None, batch_tokens=None, pairs=256, examples=1024,
          data=SHARED):
    """(EndoRM, encoded examples, label, unit): a random-weight Qwen2.5 shape (config) or a real model on LLMBar."""
    torch.manual_seed(0)
    if config:
        from transformers import AutoModelForCausalLM, Qwen2Config

        dtype = getattr(torch, dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        qwen = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
                           rope_theta=1e6, rms_norm_eps=1e-6, **QWEN_CONFIGS[config])
        rm = EndoRM(AutoModelForCausalLM.from_config(qwen, dtype=dtype).to(device), batch_tokens=batch_tokens)
        return rm, random_examples(examples, qwen.vocab_size), config, "examples"
    rm = EndoRM.from_pretrained(model, device=device, dtype=dtype, batch_tokens=batch_tokens)
    return rm, llmbar_pairs(rm, Path(data), pairs), model, "pairs"


def best_naive_batch(rm, encoded, batch_sizes, device) -> int:
    """hf-naive's fastest batch size on a warm-up subset of mixed lengths (also warms EndoRM up)."""
    warm = encoded[:: max(1, len(encoded) // 32)][:32]
    rm.score_encoded(warm)
    best_bs, best_rate = None, 0.0
    for bs in batch_sizes:
        try:
            _, s, _ = timed(lambda: naive_logprobs(rm.model, warm, bs, device), device)
        except torch.OutOfMemoryError:
            print(f"  hf-naive batch {bs}: out of memory", flush=True)
            torch.cuda.empty_cache()
            continue
        rate = sum(e.length for e in warm) / s
        print(f"  hf-naive batch {bs}: {rate:,.0f} tokens/s on the warm-up subset", flush=True)
        if rate > best_rate:
            best_bs, best_rate = bs, rate
    return best_bs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a model for the CPU run (default: SmolLM2)")
    parser.add_argument("--config", choices=sorted(QWEN_CONFIGS), help="random-weight Qwen2.5 model instead")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--pairs", type=int, default=256, help="LLMBar pairs (real model)")
    parser.add_argument("--examples", type=int, default=1024, help="random examples (--config)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="default: EndoRM's for the device")
    parser.add_argument("--naive-batches", default="1,2,4,8,16", help="batch sizes tried for hf-naive")
    parser.add_argument("--data", default=str(SHARED))
    parser.add_argument("--out", default=None, help="JSON results (default: benchmarks/results/<device>-e2e-<model>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rm, encoded, label, unit = build(device, model=args.model, config=args.config, dtype=args.dtype,
                                     batch_tokens=args.batch_tokens, pairs=args.pairs, examples=args.examples,
                                     data=Path(args.data))
    units = len(encoded) // 2 if unit == "pairs" else len(encoded)
    tokens = sum(e.length for e in encoded)
    print(f"{label} on {device_name(device)}: {units} {unit}, {len(encoded)} sequences, {tokens} tokens, "
          f"dtype {rm.head.weight.dtype}, packing {rm.packing}", flush=True)
    best_bs = best_naive_batch(rm, encoded, [int(b) for b in args.naive_batches.split(",")], device)

    ours, ours_s, ours_mem = timed(lambda: rm.score_encoded(encoded), device)
    naive, naive_s, naive_mem = timed(lambda: naive_logprobs(rm.model, encoded, best_bs, device), device)
    worst = max(abs(o.logprob - n) / max(abs(n), 1.0) for o, n in zip(ours, naive))

    rows = [
        {"contender": "endokern", "seconds": ours_s, "peak_extra_mb": ours_mem / 2**20},
        {"contender": f"hf-naive (batch {best_bs})", "seconds": naive_s, "peak_extra_mb": naive_mem / 2**20},
    ]
    for r in rows:
        r[f"{unit}_per_s"] = units / r["seconds"]
        r["tokens_per_s"] = tokens / r["seconds"]
    speedup = naive_s / ours_s
    memory_ratio = ours_mem / naive_mem if naive_mem else float("nan")
    print(f"\n| contender | s | {unit}/s | tokens/s | peak extra MB |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['contender']} | {r['seconds']:.1f} | {r[f'{unit}_per_s']:.2f} | {r['tokens_per_s']:,.0f} | "
              f"{r['peak_extra_mb']:.0f} |")
    print(f"\nendokern / hf-naive: {speedup:.2f}x the {unit} per second, {memory_ratio:.2f}x the peak extra memory; "
          f"summed log-probs agree to {worst:.2e} (relative)")

    result = {
        "model": label, "device": device_name(device), "dtype": str(rm.head.weight.dtype), "torch": torch.__version__,
        "python": platform.python_version(), "units": unit, "count": units, "sequences": len(encoded),
        "tokens": tokens, "batch_tokens": rm.batch_tokens, "rows": rows, "speedup": speedup,
        "memory_ratio": memory_ratio, "logprob_max_rel_diff": worst,
    }
    slug = re.sub(r"[^a-z0-9.]+", "-", f"{device_name(device)}-e2e-{label}".lower()).strip("-")
    out = Path(args.out) if args.out else HERE / "results" / f"{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
