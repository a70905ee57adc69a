"""What `serve`'s one-at-a-time scheduling costs: one request alone, then N clients at once.

    python benchmarks/serve_latency.py [--clients 4] [--max_tokens 64] [--repeats 3] [--dtype fp32]
        [--out benchmarks/results/serve_latency.json]

Builds a model of the minimind2-small shape (random weights: speed does not depend on what the model
knows, and a random model never ends its turn, so every answer runs the full --max_tokens), with
MiniMind's tokenizer from ../shared/tokenizers/minimind (else the package's own), starts the real
`serve` command on 127.0.0.1 and asks it, with the openai client, greedy streamed answers:
  alone       one request at a time, --repeats times: time to the first token, total time, tokens/s
  together    --clients requests sent at once: each one's time to first token and total time, and
              the wall time until the last finishes
Requests are answered one at a time, so together the k-th request waits for the k-1 before it: its
first token comes after about (k-1) x the alone time, and the wall time is about clients x alone.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MINIMIND_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "minimind"
PROMPTS = ["Who are you?", "What is the capital of France?", "Write a poem about the sea.", "What is 37 * 43?",
           "Tell me a story.", "How do plants grow?", "Name three colours.", "What is a language model?"]


def write_model(work: Path) -> tuple[Path, str]:
    import torch

    from minimind_scale.models.build import build_model, load_tokenizer, save_hf

    used = str(MINIMIND_TOKENIZER) if MINIMIND_TOKENIZER.is_dir() else None
    tokenizer = load_tokenizer(used)
    torch.manual_seed(0)
    save_hf(build_model("minimind2-small", tokenizer), tokenizer, work / "model")
    return work / "model", "MiniMind's" if used else "package default"


def timed_answer(client, prompt: str, max_tokens: int) -> dict:
    start, first = time.perf_counter(), None
    tokens = 0
    for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                                temperature=0, max_tokens=max_tokens, stream=True):
        if first is None and chunk.choices and (chunk.choices[0].delta.content
                                                or getattr(chunk.choices[0].delta, "reasoning_content", None)):
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - start
    return {"first_token_s": round(first if first is not None else total, 3), "total_s": round(total, 3),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / total, 1)}


def start_server(model_dir: Path, dtype: str, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "minimind_scale", "serve", "--model", str(model_dir), "--port", "0", "--dtype", dtype]
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    for _ in range(600):
        found = re.search(r"at (http://127\.0\.0\.1:\d+) ", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"serve did not start:\n{log.read_text()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_latency.json")
    args = parser.parse_args()
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, tokenizer = write_model(work)
        proc, url = start_server(model_dir, args.dtype, work / "serve.log")
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
            timed_answer(client, PROMPTS[0], 4)  # warm-up
            alone = [timed_answer(client, PROMPTS[i % len(PROMPTS)], args.max_tokens) for i in range(args.repeats)]
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                together = list(pool.map(lambda i: timed_answer(client, PROMPTS[i % len(PROMPTS)], args.max_tokens),
                                         range(args.clients)))
            wall = time.perf_counter() - start
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    median = {k: statistics.median(r[k] for r in alone) for k in ("first_token_s", "total_s", "tokens_per_s")}
    result = {"model": "minimind2-small shape, random weights", "tokenizer": tokenizer, "dtype": args.dtype,
              "max_tokens": args.max_tokens, "clients": args.clients, "alone": alone, "alone_median": median,
              "together": sorted(together, key=lambda r: r["total_s"]), "together_wall_s": round(wall, 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"alone (median of {args.repeats}): first token {median['first_token_s']:.2f} s, "
          f"{args.max_tokens} tokens in {median['total_s']:.2f} s ({median['tokens_per_s']:.0f} tokens/s)")
    print(f"{args.clients} at once: wall {wall:.2f} s; first token / total per request (s): "
          + ", ".join(f"{r['first_token_s']:.2f}/{r['total_s']:.2f}" for r in result["together"]))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
