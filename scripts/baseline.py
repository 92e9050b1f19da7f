"""The headline benches against benchmarks/baseline.json (run by scripts/bench).

Each figure of the baseline names the command that measures it and which
way is better. This runs those commands (with --quick: only the short ones,
with their quick arguments), prints one table of each figure now beside its
baseline, and flags a figure more than 20 % worse than its baseline. Ratios
(wmvae against PyTorch, ingest against plain consume+ack, series against
the encoder) are compared as ratios: both sides ran in the same minute on
the same box, so its noise mostly cancels; absolute figures (images/s, MB,
seconds) move with the box, and its load should be quiet when they are read.
--update writes the figures measured into the baseline with today's date,
and BENCHMARKS.md's opening table with them. --table prints that table
from the baseline as it is, running nothing.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BASELINE = os.path.join(ROOT, "benchmarks", "baseline.json")
WMVAE = os.path.join(ROOT, "target", "release", "wmvae")
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
# A figure this much worse than its baseline is flagged.
TOLERANCE = 0.20
# Held-out CarRacing frames for `bench quality` (made once, git-ignored).
FRAMES_DIR = os.path.join(ROOT, "target", "bench-frames")


def run_json(args):
    """The one JSON object a bench prints on stdout."""
    out = subprocess.run(args, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def carracing_frames():
    """train.npy and heldout.npy as BENCHMARKS.md's quality figures used them."""
    os.makedirs(FRAMES_DIR, exist_ok=True)
    paths = {}
    for name, seeds in (("train", "0-9"), ("heldout", "100-101")):
        path = os.path.join(FRAMES_DIR, name + ".npy")
        if not os.path.exists(path):
            subprocess.run([PYTHON, "scripts/carracing_frames.py", "--seeds", seeds, "--steps", "500",
                            "--out", path], cwd=ROOT, check=True)
        paths[name] = path
    return paths


def train_vs_pytorch(quick):
    steps = "10" if quick else "20"
    ours, theirs = [], []
    for _ in range(1 if quick else 3):
        ours.append(run_json([WMVAE, "bench", "train", "--device", "cpu", "--batch", "100", "--steps", steps,
                              "--threads", "2", "--json"])["train_images_per_s"])
        theirs.append(run_json([PYTHON, "scripts/torch_reference.py", "bench", "--batch", "100", "--steps", steps,
                                "--threads", "2"])["train_images_per_s"])
    return statistics.median(ours) / statistics.median(theirs)


def ingest_vs_plain(quick):
    frames = "5000" if quick else "20000"
    return run_json([WMVAE, "bench", "ingest", "--frames", frames, "--json"])["ingest_vs_plain"]


def latent_p99_over_relay(quick):
    seconds = "5" if quick else "10"
    return run_json([WMVAE, "bench", "latency", "--rate", "500", "--seconds", seconds, "--json"])[
        "latent_p99_over_relay_ms"]


def encode_256(quick):
    steps = "5" if quick else "20"
    return run_json([WMVAE, "bench", "encode", "--device", "cpu", "--steps", steps, "--json"])[
        "encode_images_per_s"]["256"]


def series_vs_encode(quick):
    rounds = "1" if quick else "3"
    return run_json([WMVAE, "bench", "series", "--device", "cpu", "--frames", "5120", "--rounds", rounds,
                     "--json"])["ratio_median"]


def idle_rss(quick):
    return run_json([WMVAE, "bench", "idle", "--json"])["idle_rss_mb"]


def trainer_failover(quick):
    return run_json([WMVAE, "bench", "failover", "--json"])["trainer_failover_s"]


def steps_to_paper_recon(quick):
    frames = carracing_frames()
    return run_json([WMVAE, "bench", "quality", "--frames", frames["train"], "--heldout", frames["heldout"],
                     "--steps", "1000", "--target-recon", "32.7", "--json"])["steps_to_recon"]


# name: (how it is measured, whether --quick runs it)
BENCHES = {
    "train_vs_pytorch_eager": (train_vs_pytorch, True),
    "ingest_vs_plain": (ingest_vs_plain, True),
    "latent_p99_over_relay_ms": (latent_p99_over_relay, True),
    "encode_images_per_s_batch_256": (encode_256, True),
    "series_vs_encode": (series_vs_encode, True),
    "idle_rss_mb": (idle_rss, True),
    "trainer_failover_s": (trainer_failover, False),
    "steps_to_paper_recon": (steps_to_paper_recon, False),
}


BENCHMARKS = os.path.join(ROOT, "BENCHMARKS.md")
# BENCHMARKS.md's opening table is the baseline's, between these lines.
TABLE_START, TABLE_END = "<!-- baseline table: scripts/baseline.py --table -->", "<!-- end of the baseline table -->"


def baseline_table(figures):
    """The baseline's figures as BENCHMARKS.md opens with them (Markdown)."""
    lines = ["| figure | value | unit | machine | measured | command |", "|---|---|---|---|---|---|"]
    for name, f in figures.items():
        lines.append(f"| `{name}` | **{f['value']}** ({f['better']} is better) | {f['unit']} | {f['machine']} | "
                     f"{f['measured']} | `{f['command']}` |")
    return "\n".join(lines)


def write_benchmarks_table(figures):
    """Rewrites BENCHMARKS.md's opening table from the baseline."""
    with open(BENCHMARKS) as f:
        text = f.read()
    before, rest = text.split(TABLE_START, 1)
    _, after = rest.split(TABLE_END, 1)
    with open(BENCHMARKS, "w") as f:
        f.write(f"{before}{TABLE_START}\n{baseline_table(figures)}\n{TABLE_END}{after}")


def worse_by(figure, now):
    """How much worse `now` is than the baseline's value, as a fraction."""
    base = figure["value"]
    if base is None or now is None or base == 0:
        return None
    if figure["better"] == "higher":
        return (base - now) / abs(base)
    return (now - base) / abs(base)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the short benches, shortened")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="only these figures")
    parser.add_argument("--update", action="store_true", help="write the figures measured into the baseline")
    parser.add_argument("--table", action="store_true", help="print the baseline as BENCHMARKS.md's table; run nothing")
    args = parser.parse_args()
    with open(BASELINE) as f:
        baseline = json.load(f)
    figures = baseline["figures"]
    if args.table:
        print(baseline_table(figures))
        return
    names = [n for n, (_, quick) in BENCHES.items() if (not args.quick or quick) and (not args.only or n in args.only)]
    rows, flagged = [], []
    for name in names:
        measure, _ = BENCHES[name]
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        now = measure(args.quick)
        worse = worse_by(figures[name], now)
        flag = worse is not None and worse > TOLERANCE
        if flag:
            flagged.append(name)
        rows.append((name, now, figures[name], worse, flag))
        if args.update:
            figures[name].update(value=now, measured=datetime.date.today().isoformat(),
                                 machine=f"{platform.node()}, {os.cpu_count()} cores", quick=args.quick)
    print("| figure | now | baseline | better | worse by | |")
    print("|---|---|---|---|---|---|")
    for name, now, figure, worse, flag in rows:
        worse_text = "-" if worse is None else f"{worse * 100:+.0f} %"
        print(f"| {name} | {now:.4g} | {figure['value']:.4g} | {figure['better']} | {worse_text} | "
              f"{'WORSE' if flag else ''} |" if figure["value"] is not None and now is not None else
              f"| {name} | {now} | {figure['value']} | {figure['better']} | - | |")
    if args.update:
        with open(BASELINE, "w") as f:
            json.dump(baseline, f, indent=2)
            f.write("\n")
        write_benchmarks_table(figures)
        print(f"wrote {os.path.relpath(BASELINE, ROOT)} and BENCHMARKS.md's table", file=sys.stderr)
    if flagged:
        print(f"more than {TOLERANCE:.0%} worse than the baseline: {', '.join(flagged)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
