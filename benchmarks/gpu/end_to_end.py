"""End to end on the GPU: EndoRM against Hugging Face naive scoring on a random-weight Qwen2.5-0.5B (151936-token
vocabulary), 1024 examples of mixed length (prompts of 16..512 tokens, responses of 16..768), one row per stage
in e2e.jsonl:

  build-model          the model (random weights, bf16) on the GPU
  naive-batch-search   hf-naive's tokens/s at each batch size on a warm-up subset (this also warms EndoRM up)
  endokern             EndoRM.score_encoded over every example: seconds, tokens/s, peak extra memory
  hf-naive             full logits, fp32 log-softmax, gather, at the fastest batch size found
  compare              speed-up, memory ratio, and the largest relative difference of the summed log-probs

The pieces are benchmarks/e2e.py's (naive_logprobs, PeakMemory). --dry-run: the two-layer qwen2.5-tiny body with
the same vocabulary, 8 short examples, on the CPU.
"""

from __future__ import annotations

import json
import time

import checklib as ck
import torch


def examples(count, vocab, prompt, response, seed=0):
    from endokern.tokenization import Encoded

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        p = int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=g))
        h = int(torch.randint(response[0], response[1] + 1, (1,), generator=g))
        ids = torch.randint(0, vocab, (p + h,), generator=g).tolist()
        out.append(Encoded(ids[:p], ids[p:]))
    return out


class Run:
    def __init__(self, ctx):
        self.ctx = ctx
        if ctx.dry:
            self.config, self.count, self.prompt, self.response, self.batches = "qwen2.5-tiny", 8, (4, 24), (4, 24), (1, 2)
        else:
            self.config, self.count, self.prompt, self.response, self.batches = (
                "qwen2.5-0.5b", 1024, (16, 512), (16, 768), (1, 2, 4, 8, 16))
        self.rm = None
        self.encoded = None
        self.saved = ctx.scratch / f"e2e-{self.config}-{self.count}.json"

    def info(self):
        return {"model": self.config, "examples": self.count, "prompt_tokens": list(self.prompt),
                "response_tokens": list(self.response)}

    def build(self):
        if self.rm is not None:
            return {}
        from e2e import QWEN_CONFIGS
        from transformers import AutoModelForCausalLM, Qwen2Config

        from endokern import EndoRM

        start = time.perf_counter()
        torch.manual_seed(0)
        dtype = torch.bfloat16 if self.ctx.cuda else torch.float32
        qwen = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6,
                           rms_norm_eps=1e-6, **QWEN_CONFIGS[self.config])
        model = AutoModelForCausalLM.from_config(qwen, dtype=dtype).to(self.ctx.device)
        self.rm = EndoRM(model)
        self.encoded = examples(self.count, qwen.vocab_size, self.prompt, self.response)
        self.ctx.sync()
        return {"seconds_build": round(time.perf_counter() - start, 2), "dtype": str(dtype),
                "parameters": sum(p.numel() for p in model.parameters()), "batch_tokens": self.rm.batch_tokens,
                "tokens": sum(e.length for e in self.encoded)}

    def timed(self, fn):
        from e2e import PeakMemory

        with PeakMemory(self.ctx.device) as mem:
            self.ctx.sync()
            start = time.perf_counter()
            result = fn()
            self.ctx.sync()
            seconds = time.perf_counter() - start
        return result, seconds, mem.extra

    def batch_search(self):
        from e2e import naive_logprobs

        self.build()
        warm = self.encoded[:: max(1, len(self.encoded) // 32)][:32]
        self.rm.score_encoded(warm)
        rates = {}
        for bs in self.batches:
            try:
                _, s, _ = self.timed(lambda bs=bs: naive_logprobs(self.rm.model, warm, bs, self.ctx.device))
                rates[str(bs)] = round(sum(e.length for e in warm) / s, 1)
            except torch.cuda.OutOfMemoryError:
                rates[str(bs)] = None
                self.ctx.free_cache()
        best = max((r, int(b)) for b, r in rates.items() if r) if any(rates.values()) else (None, None)
        return {"tokens_per_s_by_batch": rates, "best_batch": best[1]}

    def contender(self, name, best_batch):
        from e2e import naive_logprobs

        self.build()
        tokens = sum(e.length for e in self.encoded)
        if name == "endokern":
            results, seconds, extra = self.timed(lambda: self.rm.score_encoded(self.encoded))
            logprobs = [r.logprob for r in results]
        else:
            if not best_batch:
                raise RuntimeError("no naive batch size ran in the batch search")
            logprobs, seconds, extra = self.timed(
                lambda: naive_logprobs(self.rm.model, self.encoded, best_batch, self.ctx.device))
        self.saved.parent.mkdir(parents=True, exist_ok=True)
        saved = json.loads(self.saved.read_text()) if self.saved.exists() else {}
        saved[name] = logprobs
        self.saved.write_text(json.dumps(saved))
        return {"contender": name if name == "endokern" else f"hf-naive (batch {best_batch})",
                "seconds_run": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
                "examples_per_s": round(len(self.encoded) / seconds, 2), "peak_extra_mb": round(extra / 2**20, 1)}


def main(argv=None):
    ctx = ck.setup("e2e", "e2e.jsonl", __doc__.split("\n\n")[0], default_item_cap=90.0, argv=argv)
    run = Run(ctx)
    info = run.info()
    ctx.items.plan(["build-model", "naive-batch-search", "endokern", "hf-naive", "compare"])
    ctx.items.run("build-model", run.build, **info)
    search = ctx.items.run("naive-batch-search", run.batch_search, **info)
    ours = ctx.items.run("endokern", lambda: run.contender("endokern", None), **info)
    naive = ctx.items.run("hf-naive", lambda: run.contender("hf-naive", search.get("best_batch")), **info)

    def compare():
        if ours.get("status") != "ok" or naive.get("status") != "ok":
            raise RuntimeError("endokern or hf-naive has no measurement to compare")
        saved = json.loads(run.saved.read_text())
        worst = max(abs(o - n) / max(abs(n), 1.0) for o, n in zip(saved["endokern"], saved["hf-naive"]))
        return {"speedup": round(naive["seconds_run"] / ours["seconds_run"], 3),
                "memory_ratio": round(ours["peak_extra_mb"] / naive["peak_extra_mb"], 4) if naive["peak_extra_mb"]
                else None, "logprob_max_rel_diff": worst}

    ctx.items.run("compare", compare, **info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
