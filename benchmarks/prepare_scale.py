"""Data preparation at scale: `prepare` on a generated ~1 GB corpus, then a cache-hit training start.

    python benchmarks/prepare_scale.py [--size_gb 1.0] [--stage pretrain|full_sft] [--num_proc N]
        [--batch_size 1] [--accumulation_steps 1] [--work DIR] [--keep] [--quiet]
        [--out benchmarks/results/prepare_scale.json]

1. Writes a deterministic jsonl corpus of about --size_gb GiB (seeded numpy RNG): pretrain records
   {"text": ...} of a few hundred to a few thousand characters, mostly English with some Chinese and
   mixed lines; with --stage full_sft, {"conversations": [user, assistant, ...]} records instead.
2. Runs the real `python -m minimind_scale prepare STAGE` (max_seq_len 512, --num_proc N, packing at
   the stage's default, i.e. on) with a fresh MINIMIND_SCALE_CACHE, timing it and sampling the
   resident memory of the process and all its descendants (datasets.map workers) every 0.2 s from
   /proc: the peak of the summed VmRSS, the largest single-process VmRSS, and (as a check on the
   sum, which counts pages shared by forked workers once per process) the peak summed PSS and RssAnon,
   overall and per phase (tokenising, packing, exit; phase ends from the time stamps of prepare's
   output lines). Records and tokens come from the data_report.json that prepare writes beside the
   cached data; records/s and tokens/s are over the whole wall time.
3. Runs the stage's training command (--model tiny --max_steps 1 --dtype fp32) on the same files and
   cache — a cache hit — and times it until the first row appears in its metrics.jsonl, memory sampled
   the same way. The step is one row (--batch_size 1 --accumulation_steps 1) so that the time measures
   reaching training, not the arithmetic of the stage's default 32x8-row step, which alone takes minutes
   on a CPU; pass 0 to either to use the stage's default.

Prints a Markdown table and writes JSON (paths relative to the work directory, the 1-minute load average
before and after each run: other work on the machine slows the timings). The work directory (corpus,
cache, logs, per-sample memory traces mem_*.tsv) is deleted unless --keep.

    python benchmarks/prepare_scale.py --ratios [--repeats 3] [--num_proc 2] [--pretrain_mb 60] [--sft_mb 30]
        [--out benchmarks/results/prepare_ratios.json]

--ratios measures `prepare` against the raw Rust tokenizer on the shared real data instead (both cases in
one run, so other load on the machine weighs on both sides alike): a pretrain corpus of --pretrain_mb MB
(the ../shared/data/pretrain_*.jsonl lines, repeated) and an SFT corpus of --sft_mb MB (the sft_*.jsonl
lines: alpaca, identity and tool-call conversations). Each repeat runs, per case, the real
`prepare pretrain` / `prepare full_sft` (cold cache, --num_proc workers, packing on, max_seq_len 512),
timed from start to exit (its process tree's summed RSS sampled as above, but from /proc/PID/status alone:
summing PSS reads smaps_rollup, whose page walk costs about a third of a core at 5 Hz, CPU the raw
tokenizer's side would not lose; PSS is not reported here), then `Tokenizer.encode_batch` on the same
texts in a fresh process: the `text` fields for pretrain; for SFT the conversations already rendered by
`apply_chat_template` (rendering not timed). The tokenizer runs twice: on one thread (TOKENIZERS_PARALLELISM=false, as
prepare's workers each run it), the reference of the ratio targets, and with its default parallelism
(all cores). A ratio is the raw tokenizer's time over prepare's time on the same records (= prepare's
tokens/s over the tokenizer's, counting the tokenizer's tokens on both sides; prepare keeps fewer,
having truncated to max_seq_len). Prints the range of each ratio over the repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "minimind"
GIB = 1 << 30

# --------------------------------------------------------------------------- corpus

EN_COMMON = """the of and to in is that for it as was with be by on not he this are or his from at which but have
an they you were her she there been one all we their has would when if so no will can more about said what up its
out who into them some could time only new other than then also two these may first any like now my over such our
man me even most made after between many those before must through back years where much your way well down should
because each just people state very how work year make long great still own see men day world use life under while
last here might both part never being same another know against though three high without again place small point
government school number system group city water study process house during family found every large problem public
power change market model data result energy light level research history water river mountain village morning
evening student teacher science language computer network memory program training learning answer question
simple careful quickly slowly together important different possible general local national early later recent
common natural social economic political human modern single final major central clear strong free full true
describe explain consider provide develop include continue follow create remain offer build report design measure
""".split()
ZH_CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行"
    "学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外"
    "天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情"
    "者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角"
    "期根论运农指几九区强放决西被干做必战先回则任取据处理府研质记海江河湖春夏秋冬风雨雪花草树木鸟鱼书读写语言音乐画"
)
ZH_PUNCT = ["，", "，", "，", "、", "；"]
EN_PUNCT = [".", ".", ".", ".", "?", "!", ";"]


def _zipf_probs(n: int, s: float = 1.05) -> np.ndarray:
    p = 1.0 / np.power(np.arange(1, n + 1) + 2.7, s)
    return p / p.sum()


class TextPool:
    """Pools of English and Chinese sentences built once from a seeded RNG; lines draw from them."""

    def __init__(self, rng: np.random.Generator, n_en: int = 120_000, n_zh: int = 40_000):
        syll = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ea")]
        n_synth = 12_000
        synth = ["".join(syll[j] for j in rng.integers(0, len(syll), rng.integers(2, 5))) for _ in range(n_synth)]
        vocab = EN_COMMON + synth
        probs = _zipf_probs(len(vocab))
        self.en = []
        lengths = rng.integers(4, 28, n_en)
        words = rng.choice(len(vocab), size=int(lengths.sum()), p=probs)
        nums = rng.integers(0, 10_000, n_en)
        at = 0
        for i, n in enumerate(lengths):
            w = [vocab[j] for j in words[at:at + n]]
            at += n
            if i % 7 == 0:
                w.insert(int(rng.integers(0, len(w))), str(nums[i]))
            if i % 5 == 0 and len(w) > 8:
                w[len(w) // 2] += ","
            s = " ".join(w)
            s = s[0].upper() + s[1:] + EN_PUNCT[i % len(EN_PUNCT)]
            if i % 19 == 0:
                s += "\n"
            self.en.append(s)
        zh_probs = _zipf_probs(len(ZH_CHARS), 0.9)
        self.zh = []
        lengths = rng.integers(8, 48, n_zh)
        chars = rng.choice(len(ZH_CHARS), size=int(lengths.sum()), p=zh_probs)
        at = 0
        for i, n in enumerate(lengths):
            c = [ZH_CHARS[j] for j in chars[at:at + n]]
            at += n
            for k in range(int(rng.integers(0, 3))):
                c.insert(int(rng.integers(1, len(c))), ZH_PUNCT[(i + k) % len(ZH_PUNCT)])
            self.zh.append("".join(c) + ("。" if i % 6 else "？"))
        self.en_mean = float(np.mean([len(s) for s in self.en])) + 1
        self.zh_mean = float(np.mean([len(s) for s in self.zh]))

    def texts(self, rng: np.random.Generator, n: int, median_chars: float = 1100, lo: int = 200,
              hi: int = 6000) -> list[str]:
        """`n` texts: ~70% English, ~15% Chinese, ~15% mixed, lengths log-normal around `median_chars`."""
        target = np.clip(rng.lognormal(np.log(median_chars), 0.7, n), lo, hi)
        kind = rng.choice(3, size=n, p=[0.7, 0.15, 0.15])
        out = []
        for t, k in zip(target, kind):
            if k == 0:
                idx = rng.integers(0, len(self.en), max(2, int(np.ceil(t / self.en_mean))))
                out.append(" ".join(self.en[i] for i in idx))
            elif k == 1:
                idx = rng.integers(0, len(self.zh), max(2, int(np.ceil(t / self.zh_mean))))
                out.append("".join(self.zh[i] for i in idx))
            else:
                n_en = max(1, int(0.6 * t / self.en_mean))
                n_zh = max(1, int(0.4 * t / self.zh_mean))
                parts = [self.en[i] for i in rng.integers(0, len(self.en), n_en)]
                parts += [self.zh[i] for i in rng.integers(0, len(self.zh), n_zh)]
                order = rng.permutation(len(parts))
                out.append(" ".join(parts[i] for i in order))
        return out


def generate_corpus(path: Path, size_bytes: int, stage: str, seed: int = 1234, block: int = 4000) -> dict:
    rng = np.random.default_rng(seed)
    pool = TextPool(rng)
    written, lines = 0, 0
    with open(path, "wb") as f:
        while written < size_bytes:
            if stage == "pretrain":
                recs = [{"text": t} for t in pool.texts(rng, block)]
            else:
                questions = pool.texts(rng, block, median_chars=160, lo=20, hi=800)
                answers = pool.texts(rng, block, median_chars=900, lo=100, hi=4000)
                multi = rng.random(block) < 0.2
                recs = []
                for i in range(block):
                    conv = [{"role": "user", "content": questions[i]}, {"role": "assistant", "content": answers[i]}]
                    if multi[i]:
                        conv += [{"role": "user", "content": questions[i - 1]},
                                 {"role": "assistant", "content": answers[i - 1][:600]}]
                    recs.append({"conversations": conv})
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8")
            f.write(data)
            written += len(data)
            lines += len(recs)
    return {"bytes": written, "lines": lines}


# --------------------------------------------------------------------------- process-tree memory


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _status_kb(pid: int, keys=("VmRSS", "RssAnon")) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples the memory of `pid` and all its descendants every `interval` seconds until stopped.

    `pss`: also the PSS, from /proc/PID/smaps_rollup, which the kernel computes by walking every page of
    the process: about 16 ms of CPU per sample of one 700 MB process, a third of a core at 5 Hz for
    prepare's three processes. Without it only /proc/PID/status is read (microseconds) and PSS reads 0.
    """

    def __init__(self, pid: int, interval: float = 0.2, pss: bool = True):
        super().__init__(daemon=True)
        self.pid, self.interval, self.pss = pid, interval, pss
        self.peak_sum_rss = self.peak_max_rss = self.peak_sum_pss = self.peak_sum_anon = 0
        self.peak_procs = 0
        self.samples = 0
        # (s, summed RSS, summed anon, summed PSS, largest RSS) kB
        self.trace: list[tuple[float, int, int, int, int]] = []
        self.t0 = time.time()
        self._done = threading.Event()

    def sample(self) -> None:
        kids = _children_map()
        tree, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            tree.append(p)
            todo += kids.get(p, [])
        rss = anon = pss = biggest = 0
        for p in tree:
            s = _status_kb(p)
            rss += s.get("VmRSS", 0)
            anon += s.get("RssAnon", 0)
            biggest = max(biggest, s.get("VmRSS", 0))
            pss += _pss_kb(p) if self.pss else 0
        self.peak_sum_rss = max(self.peak_sum_rss, rss)
        self.peak_max_rss = max(self.peak_max_rss, biggest)
        self.peak_sum_pss = max(self.peak_sum_pss, pss)
        self.peak_sum_anon = max(self.peak_sum_anon, anon)
        self.peak_procs = max(self.peak_procs, len(tree))
        self.samples += 1
        self.trace.append((round(time.time() - self.t0, 2), rss, anon, pss, biggest))

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def stop(self) -> dict:
        self._done.set()
        self.join()
        mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
        return {"peak_rss_sum_mb": mb(self.peak_sum_rss), "peak_rss_max_process_mb": mb(self.peak_max_rss),
                "peak_pss_sum_mb": mb(self.peak_sum_pss), "peak_anon_sum_mb": mb(self.peak_sum_anon),
                "peak_processes": self.peak_procs, "samples": self.samples}

    def phase_peaks(self, marks: dict[str, float | None]) -> dict[str, dict]:
        """Peak summed RSS / PSS / anon (MB) between consecutive time marks (phase name -> end time)."""
        out, start = {}, 0.0
        for name, end in marks.items():
            if end is None:
                continue
            rows = [r for r in self.trace if start <= r[0] <= end]
            if rows:
                out[name] = {"until_s": end, "rss_sum_mb": round(max(r[1] for r in rows) / 1024, 1),
                             "anon_sum_mb": round(max(r[2] for r in rows) / 1024, 1),
                             "pss_sum_mb": round(max(r[3] for r in rows) / 1024, 1),
                             "rss_max_process_mb": round(max(r[4] for r in rows) / 1024, 1)}
            start = end
        return out


class StderrLog(threading.Thread):
    """Copies a pipe to a log file and keeps each text line (split on \\r and \\n) with its arrival time."""

    def __init__(self, pipe, log_path: Path, t0: float, echo: bool):
        super().__init__(daemon=True)
        self.pipe, self.log_path, self.t0, self.echo = pipe, log_path, t0, echo
        self.lines: list[tuple[float, str]] = []

    def run(self) -> None:
        buf = b""
        with open(self.log_path, "wb") as log:
            while chunk := self.pipe.read1(1 << 16):
                log.write(chunk)
                if self.echo:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
                buf += chunk
                *done, buf = re.split(rb"[\r\n]", buf)
                now = time.time() - self.t0
                self.lines += [(now, d.decode("utf-8", "replace")) for d in done if d.strip()]
        if buf.strip():
            self.lines.append((time.time() - self.t0, buf.decode("utf-8", "replace")))


def run_measured(cmd: list[str], env: dict, log_path: Path, echo: bool, wait_file: Path | None = None,
                 pss: bool = True) -> dict:
    """Run `cmd`, sampling its process tree's memory (`pss`: see TreeMemory); with `wait_file`, also the
    time until that file has a first non-empty line."""
    t0, load_before = time.time(), os.getloadavg()[0]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(REPO))
    mem = TreeMemory(proc.pid, pss=pss)
    mem.start()
    reader = StderrLog(proc.stdout, log_path, t0, echo)
    reader.start()
    first_row = None
    while proc.poll() is None:
        if wait_file is not None and first_row is None and wait_file.is_file():
            if wait_file.read_text().strip():
                first_row = time.time() - t0
        time.sleep(0.05)
    wall = time.time() - t0
    if wait_file is not None and first_row is None and wait_file.is_file() and wait_file.read_text().strip():
        first_row = wall  # written in the last poll interval
    reader.join()
    # The 1-minute load average before and after: other work on the machine slows the timings.
    out = {"rc": proc.returncode, "wall_s": round(wall, 2), **mem.stop(), "lines": reader.lines, "mem": mem,
           "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if wait_file is not None:
        out["first_step_s"] = round(first_row, 2) if first_row is not None else None
    return out


# --------------------------------------------------------------------------- main


def _when(lines: list[tuple[float, str]], needle: str) -> float | None:
    return next((round(t, 2) for t, s in lines if needle in s), None)


# --------------------------------------------------------------------------- prepare vs the raw tokenizer

SHARED_DATA = REPO.parent / "shared" / "data"
RATIO_CASES = {"pretrain": "pretrain_", "full_sft": "sft_"}


def shared_corpus(path: Path, prefix: str, size_bytes: int) -> dict:
    """The non-blank lines of ../shared/data/PREFIX*.jsonl (files in name order), repeated until `size_bytes`."""
    lines = [line for f in sorted(SHARED_DATA.glob(f"{prefix}*.jsonl")) for line in open(f, "rb") if line.strip()]
    if not lines:
        raise SystemExit(f"no {prefix}*.jsonl in {SHARED_DATA}")
    written = n = 0
    with open(path, "wb") as f:
        while written < size_bytes:
            line = lines[n % len(lines)]
            f.write(line if line.endswith(b"\n") else line + b"\n")
            written += len(line)
            n += 1
    return {"bytes": written, "lines": n}


def raw_tokenizer(stage: str, corpus: str, tokenizer: str) -> dict:
    """In this process: encode_batch over the corpus's texts (SFT: rendered by the chat template first, not
    timed); the tokenizer's own parallelism is whatever the environment leaves it (all cores by default)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    records = [json.loads(line) for line in open(corpus, "rb") if line.strip()]
    if stage == "pretrain":
        texts = [r["text"] for r in records]
    else:
        from minimind_scale.chat.messages import normalize_messages

        texts = []
        for r in records:
            messages, tools = normalize_messages(r)
            texts.append(tok.apply_chat_template(messages, tools=tools, tokenize=False))
    backend = tok.backend_tokenizer
    t = time.perf_counter()
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    seconds = time.perf_counter() - t
    return {"texts": len(texts), "tokens": sum(len(e.ids) for e in encodings), "seconds": round(seconds, 3)}


def _range(values: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"


def measure_ratios(args) -> None:
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="prepare_ratios-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = {"pretrain": args.pretrain_mb, "full_sft": args.sft_mb}
    corpora, runs = {}, {stage: [] for stage in RATIO_CASES}
    try:
        for stage, prefix in RATIO_CASES.items():
            corpora[stage] = {"path": work / f"{stage}_shared.jsonl"}
            corpora[stage].update(shared_corpus(corpora[stage]["path"], prefix, int(sizes[stage] * 1e6)))
        prep_env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        raw_envs = {"1 thread": prep_env,
                    "all cores": {k: v for k, v in prep_env.items() if k != "TOKENIZERS_PARALLELISM"}}
        for rep in range(args.repeats):
            for stage in RATIO_CASES:
                corpus, cache = corpora[stage]["path"], work / "cache"
                shutil.rmtree(cache, ignore_errors=True)
                cmd = [sys.executable, "-m", "minimind_scale", "prepare", stage, "--data_path", str(corpus),
                       "--max_seq_len", str(args.max_seq_len), "--num_proc", str(args.num_proc),
                       "--tokenizer", os.path.relpath(args.tokenizer, REPO)]
                # Only the summed RSS is reported here: sampling PSS too would take CPU from prepare's
                # workers (TreeMemory), a cost the raw tokenizer's side does not bear.
                prep = run_measured(cmd, dict(prep_env, MINIMIND_SCALE_CACHE=str(cache)), work / f"{stage}.log",
                                    echo=not args.quiet, pss=False)
                if prep["rc"] != 0:
                    raise SystemExit(f"prepare {stage} failed (exit {prep['rc']}); see {work / (stage + '.log')}")
                unpacked = Path(next(s for _, s in reversed(prep["lines"]) if s.strip().startswith("/")).strip())
                report = json.loads((unpacked / "data_report.json").read_text())
                raw_cmd = [sys.executable, str(Path(__file__).resolve()), "--_raw", stage, str(corpus),
                           "--tokenizer", args.tokenizer]
                raw = {name: json.loads(subprocess.run(raw_cmd, env=env, cwd=str(REPO), check=True, capture_output=True,
                                                       text=True).stdout.strip().splitlines()[-1])
                       for name, env in raw_envs.items()}
                prep.pop("mem")
                lines = prep.pop("lines")
                tokens = raw["1 thread"]["tokens"]
                run = {"prepare_s": prep["wall_s"], "tokenised_at_s": _when(lines, "tokenised "),
                       "packed_at_s": _when(lines, "packed "), "records": report["records"],
                       "kept_tokens": report["tokens"], "raw_tokens": tokens,
                       "prepare_tokens_per_s": round(tokens / prep["wall_s"]),
                       "load_avg_1min": prep["load_avg_1min"], "peak_rss_sum_mb": prep["peak_rss_sum_mb"]}
                for name, r in raw.items():
                    key = name.replace(" ", "_")
                    run[f"raw_s_{key}"] = r["seconds"]
                    run[f"raw_tokens_per_s_{key}"] = round(r["tokens"] / r["seconds"])
                    run[f"ratio_{key}"] = round(r["seconds"] / prep["wall_s"], 3)
                runs[stage].append(run)
                print(f"[{rep + 1}/{args.repeats}] {stage}: prepare {run['prepare_s']:.1f} s (tokenised at "
                      f"{run['tokenised_at_s']} s); raw encode_batch {run['raw_s_1_thread']:.1f} s on 1 thread, "
                      f"{run['raw_s_all_cores']:.1f} s on all cores -> ratios {run['ratio_1_thread']:.2f}, "
                      f"{run['ratio_all_cores']:.2f}", file=sys.stderr)
        print(f"\n`prepare` vs the raw tokenizer's encode_batch on the shared real data, {args.num_proc} workers, "
              f"{os.cpu_count()} CPUs, {args.repeats} runs (ranges)\n")
        print("| case | corpus | records | tokens | prepare s | prepare tokens/s | raw s, 1 thread | "
              "raw tokens/s, 1 thread | ratio to 1 thread | raw s, all cores | ratio to all cores |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for stage, rs in runs.items():
            c = corpora[stage]
            print(f"| {stage} | {c['bytes'] / 1e6:.0f} MB | {rs[0]['records']:,} | {rs[0]['raw_tokens']:,} | "
                  f"{_range([r['prepare_s'] for r in rs], '{:.1f}')} | "
                  f"{_range([r['prepare_tokens_per_s'] / 1e3 for r in rs], '{:.0f}k')} | "
                  f"{_range([r['raw_s_1_thread'] for r in rs], '{:.1f}')} | "
                  f"{_range([r['raw_tokens_per_s_1_thread'] / 1e3 for r in rs], '{:.0f}k')} | "
                  f"{_range([r['ratio_1_thread'] for r in rs])} | "
                  f"{_range([r['raw_s_all_cores'] for r in rs], '{:.1f}')} | "
                  f"{_range([r['ratio_all_cores'] for r in rs])} |")
        ratios = {stage: {k: [r[f"ratio_{k}"] for r in rs] for k in ("1_thread", "all_cores")}
                  for stage, rs in runs.items()}
        print(f"\nratio to the raw tokenizer on 1 thread: SFT {_range(ratios['full_sft']['1_thread'])} "
              f"(target >= 0.7), pretrain {_range(ratios['pretrain']['1_thread'])} (target >= 0.8); on all cores: SFT "
              f"{_range(ratios['full_sft']['all_cores'])}, pretrain {_range(ratios['pretrain']['all_cores'])}")
        result = {"settings": {"num_proc": args.num_proc, "max_seq_len": args.max_seq_len, "cpu_count": os.cpu_count(),
                               "repeats": args.repeats, "tokenizer": os.path.relpath(args.tokenizer, REPO)},
                  "corpora": {s: {k: v for k, v in c.items() if k != "path"} for s, c in corpora.items()},
                  "runs": runs, "ratios": ratios}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {os.path.relpath(args.out, REPO)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_raw":  # the raw-tokenizer side of --ratios, in its own process
        print(json.dumps(raw_tokenizer(sys.argv[2], sys.argv[3], sys.argv[sys.argv.index("--tokenizer") + 1])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size_gb", type=float, default=1.0, help="corpus size in GiB")
    ap.add_argument("--stage", default="pretrain", choices=["pretrain", "full_sft"])
    ap.add_argument("--num_proc", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max_seq_len", type=int, default=512)
    ap.add_argument("--tokenizer", default=str(SHARED_TOKENIZER) if SHARED_TOKENIZER.is_dir() else None)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch_size", type=int, default=1,
                    help="rows per micro-batch of the cache-hit training run (0: the stage's default, 32 for pretrain)")
    ap.add_argument("--accumulation_steps", type=int, default=1,
                    help="micro-batches in its one step (0: the stage's default, 8 for pretrain)")
    ap.add_argument("--work", default=None, help="work directory (default: a new temporary one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--quiet", action="store_true", help="do not echo the commands' output")
    ap.add_argument("--out", default=None,
                    help="JSON results (default benchmarks/results/prepare_scale.json, or prepare_ratios.json)")
    ap.add_argument("--ratios", action="store_true",
                    help="measure prepare against the raw tokenizer on the shared real data (pretrain and full_sft)")
    ap.add_argument("--repeats", type=int, default=3, help="with --ratios: runs of each case")
    ap.add_argument("--pretrain_mb", type=float, default=60, help="with --ratios: pretrain corpus size, MB")
    ap.add_argument("--sft_mb", type=float, default=30, help="with --ratios: SFT corpus size, MB")
    args = ap.parse_args()
    results = REPO / "benchmarks" / "results"
    if args.ratios:
        if not args.tokenizer:
            raise SystemExit("--ratios needs the shared MiniMind tokenizer (or --tokenizer DIR)")
        args.out = args.out or str(results / "prepare_ratios.json")
        return measure_ratios(args)
    args.out = args.out or str(results / "prepare_scale.json")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="prepare_scale-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"{args.stage}_corpus.jsonl"
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    try:
        t = time.time()
        info = generate_corpus(corpus, int(args.size_gb * GIB), args.stage, args.seed)
        info["generate_s"] = round(time.time() - t, 1)
        print(f"corpus: {info['lines']:,} lines, {info['bytes'] / GIB:.2f} GiB in {info['generate_s']} s",
              file=sys.stderr)

        env = dict(os.environ, MINIMIND_SCALE_CACHE=str(cache), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        common = ["--data_path", str(corpus), "--max_seq_len", str(args.max_seq_len)]
        if args.tokenizer:
            common += ["--tokenizer", os.path.relpath(args.tokenizer, REPO)]  # the commands run in the repository root
        prep_cmd = [sys.executable, "-m", "minimind_scale", "prepare", args.stage, *common,
                    "--num_proc", str(args.num_proc)]
        print("$ " + " ".join(prep_cmd), file=sys.stderr)
        prep = run_measured(prep_cmd, env, work / "prepare.log", echo=not args.quiet)
        if prep["rc"] != 0:
            raise SystemExit(f"prepare failed (exit {prep['rc']}); see {work / 'prepare.log'}")
        unpacked = Path(next(s for _, s in reversed(prep["lines"]) if s.strip().startswith("/")).strip())
        data_report = json.loads((unpacked / "data_report.json").read_text())
        packed_dir = unpacked.with_name(unpacked.name + "-packed")
        pack_report = json.loads((packed_dir / "packing_report.json").read_text()) if packed_dir.is_dir() else None
        progress = [s for _, s in prep["lines"] if s.startswith("tokenising") and "%" in s]
        prep_lines = prep.pop("lines")

        out_dir = work / "out"
        train_cmd = [sys.executable, "-m", "minimind_scale", args.stage, *common, "--model", "tiny", "--max_steps", "1",
                     "--log_interval", "1", "--dtype", "fp32", "--out_dir", str(out_dir)]
        if args.batch_size:
            train_cmd += ["--batch_size", str(args.batch_size)]
        if args.accumulation_steps:
            train_cmd += ["--accumulation_steps", str(args.accumulation_steps)]
        print("$ " + " ".join(train_cmd), file=sys.stderr)
        hit = run_measured(train_cmd, env, work / "train.log", echo=not args.quiet, wait_file=out_dir / "metrics.jsonl")
        if hit["rc"] != 0:
            raise SystemExit(f"training run failed (exit {hit['rc']}); see {work / 'train.log'}")
        hit_lines = hit.pop("lines")
        if not any("using cached tokenised data" in s for _, s in hit_lines):
            raise SystemExit("the training run did not hit the cache")

        records, tokens = data_report["records"], data_report["tokens"]
        prep_phases = {"tokenise": _when(prep_lines, "tokenised "), "pack": _when(prep_lines, "packed "),
                       "exit": prep["wall_s"]}
        prep_mem = prep.pop("mem")
        prep.update(records_per_s=round(records / prep["wall_s"], 1), tokens_per_s=round(tokens / prep["wall_s"], 1),
                    phases_end_s=prep_phases, phase_peaks=prep_mem.phase_peaks(prep_phases),
                    progress_bar=bool(progress), progress_last=progress[-1].strip() if progress else None,
                    output=[s.replace(str(work) + "/", "") for _, s in prep_lines if not re.search(r"\d+%\|", s)])
        ready = hit["first_step_s"] or hit["wall_s"]
        hit_phases = {"start_to_cache_found": _when(hit_lines, "using cached tokenised data"),
                      "load_packed": _when(hit_lines, "packed "),
                      "build_model": _when(hit_lines, f"[{args.stage}] model"),
                      "first_step": hit["first_step_s"], "exit": hit["wall_s"]}
        hit_mem = hit.pop("mem")
        hit.update(records_per_s=round(records / ready, 1), tokens_per_s=round(tokens / ready, 1),
                   phases_end_s=hit_phases, phase_peaks=hit_mem.phase_peaks(hit_phases))
        for name, m in (("prepare", prep_mem), ("train", hit_mem)):
            (work / f"mem_{name}.tsv").write_text("s\trss_sum_kb\tanon_sum_kb\tpss_sum_kb\trss_max_kb\n"
                                                 + "".join("\t".join(map(str, r)) + "\n" for r in m.trace))
        result = {
            "settings": {"stage": args.stage, "size_gb": args.size_gb, "num_proc": args.num_proc,
                         "max_seq_len": args.max_seq_len, "seed": args.seed, "cpu_count": os.cpu_count(),
                         "tokenizer": os.path.relpath(args.tokenizer, REPO) if args.tokenizer else "packaged default",
                         "prepare_cmd": "python -m minimind_scale prepare "
                                        + " ".join(prep_cmd[4:]).replace(str(work) + "/", ""),
                         "train_cmd": "python -m minimind_scale "
                                      + " ".join(train_cmd[3:]).replace(str(work) + "/", "")},
            "corpus": info,
            "data_report": data_report,
            "packing_report": pack_report,
            "prepare": prep,
            "cache_hit": hit,
            "checks": {"prepare_peak_rss_sum_under_3gb": prep["peak_rss_sum_mb"] < 3 * 1024,
                       "cache_hit_first_step_under_15s": hit["first_step_s"] is not None and hit["first_step_s"] < 15,
                       "prepare_progress_bar": bool(progress)},
        }
        print()
        print(f"`prepare {args.stage}` on {info['bytes'] / GIB:.2f} GiB ({records:,} records, {tokens:,} tokens), "
              f"num_proc {args.num_proc}, {os.cpu_count()} CPUs\n")
        print("| run | wall s | records/s | tokens/s | peak RSS summed MB | peak RSS largest process MB |")
        print("|---|---:|---:|---:|---:|---:|")
        print(f"| prepare (first run) | {prep['wall_s']:.1f} | {prep['records_per_s']:,.0f} | "
              f"{prep['tokens_per_s']:,.0f} | {prep['peak_rss_sum_mb']:,.0f} | "
              f"{prep['peak_rss_max_process_mb']:,.0f} |")
        print(f"| {args.stage} cache hit → first step logged | {ready:.1f} | {hit['records_per_s']:,.0f} | "
              f"{hit['tokens_per_s']:,.0f} | {hit['peak_rss_sum_mb']:,.0f} | {hit['peak_rss_max_process_mb']:,.0f} |")
        print(f"\nchecks: {result['checks']}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {os.path.relpath(args.out, REPO)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
