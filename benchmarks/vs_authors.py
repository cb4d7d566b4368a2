"""The template's training step beside the authors' PyTorch template, interleaved in one sitting.

Each round runs, every one in a fresh process: the authors' template (``../shared/bench/
authors_template_bench.py``: their ``v1d3`` DenseNet-121 with Variational DropPath, SGD
momentum 0.9) in float32 and under ``torch.autocast`` bfloat16, then ours
(``benchmarks/train_step.py``'s child: the full template, v-DropPath on) per variant.  Same
shape for both: 16x112^2, batch 2, 174 classes, 2 threads.  Reports the median step over
rounds with its range (bfloat16 variants against their autocast, the others against their
float32), the peak RSS of each process (``/usr/bin/time``'s %M for theirs,
``ru_maxrss`` for ours: the same quantity) and the ratios: speed = their step / ours (> 1:
ours faster), memory = our peak / theirs.  Ours also reports its first step as trace and
first call (graph optimisation + first run).

The authors' code and PyTorch stay outside the project (set-up: ``../shared/bench/README.md``):

    .venv/bin/python benchmarks/vs_authors.py --authors_dir <their snapshot> \\
        --torch_python <venv with torch>/bin/python --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_step  # noqa: E402  (our side: one child process per variant)

HARNESS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "bench",
                       "authors_template_bench.py")


def authors(args, bf16: bool) -> dict:
    cmd = ["/usr/bin/time", "-f", "peak_kb %M", args.torch_python, args.harness, args.authors_dir,
           "--frames", "16", "--size", "112", "--batch", "2", "--steps", str(args.steps),
           "--threads", "2"] + (["--bf16"] if bf16 else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    peak = [l for l in r.stderr.splitlines() if l.startswith("peak_kb")]
    if r.returncode != 0 or not peak:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {"step_seconds": out["step_s_median"], "peak_rss_gb": int(peak[-1].split()[1]) / 1e6}


def ours(args, variant: str) -> dict:
    ns = argparse.Namespace(steps=args.steps, full_frames=16, full_crop=112, full_batch=2,
                            backbone_frames=8, backbone_crop=112, backbone_batch=2)
    return train_step._run_child("full", variant, ns)


def _median(rows, key):
    vals = [r[key] for r in rows if key in r]
    return (round(statistics.median(vals), 3), [min(vals), max(vals)]) if vals else (None, None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--authors_dir", required=True, help="their snapshot (scenarios/Probabilistic3DCNN)")
    ap.add_argument("--torch_python", required=True, help="a Python with torch installed")
    ap.add_argument("--harness", default=HARNESS)
    ap.add_argument("--variants", default="float32,memory_efficient,mixed_bfloat16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    for path in (args.authors_dir, args.torch_python, args.harness):
        if not os.path.exists(path):
            raise SystemExit(f"not found: {path} (set-up: ../shared/bench/README.md)")
    variants = args.variants.split(",")
    runs = {}
    for _ in range(args.rounds):
        for name, bf16 in (("authors float32", False), ("authors bf16", True)):
            runs.setdefault(name, []).append(authors(args, bf16))
            print(json.dumps({name: runs[name][-1]}), file=sys.stderr, flush=True)
        for v in variants:
            runs.setdefault(v, []).append(ours(args, v))
            print(json.dumps({v: runs[v][-1]}), file=sys.stderr, flush=True)
    table = {}
    for name, rows in runs.items():
        step, step_range = _median(rows, "step_seconds")
        peak, peak_range = _median(rows, "peak_rss_gb")
        row = {"step_seconds": step, "step_range": step_range, "peak_rss_gb": peak,
               "peak_range": peak_range, "rounds": len(rows),
               "errors": [r["error"] for r in rows if "error" in r]}
        for k in ("trace_seconds", "optimise_seconds", "first_step_seconds"):
            if any(k in r for r in rows):
                row[k] = _median(rows, k)[0]
        table[name] = row
    ratios = {}
    for v in variants:
        against = "authors " + ("bf16" if "bfloat16" in v else "float32")
        theirs = table.get(against, {})
        mine = table.get(v, {})
        if theirs.get("step_seconds") and mine.get("step_seconds"):
            ratios[v] = {"against": against,
                         "speed": round(theirs["step_seconds"] / mine["step_seconds"], 3),
                         "memory": round(mine["peak_rss_gb"] / theirs["peak_rss_gb"], 3)}
    print(json.dumps({"shape": "16x112x112, batch 2, 174 classes, 2 threads",
                      "steps": args.steps, "rounds": args.rounds, "table": table,
                      "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
