"""Cohort throughput (issue #18 item 3): the demo's participants run as one nipype graph against one graph per
participant (the loop of earlier versions), same machine state, back to back. One command, by hand:

    python benchmarks/cohort_throughput.py --workdir /tmp/cohort --participants 6 --nprocs 2

For each mode: wall time, CPU seconds and CPU utilisation over the run (CPU seconds / wall / nprocs). CPU seconds
are the machine's busy time from /proc/stat (all cores, user + nice + system + irq + softirq) over the run:
nipype's worker pools are not reaped into the parent's rusage (getrusage(RUSAGE_CHILDREN) saw 5-8 CPU-s for
runs that kept both cores busy), so run this on an otherwise idle machine; the load before and after is
recorded. Each mode starts from an empty work folder. Writes <workdir>/cohort.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (first line of /proc/stat, all cores)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = (fields + [0] * 7)[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def timed(command: list[str]) -> tuple[float, float, int]:
    busy = busy_seconds()
    start = time.monotonic()
    rc = subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return time.monotonic() - start, busy_seconds() - busy, rc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--participants", type=int, default=6)
    parser.add_argument("--nprocs", type=int, default=2)
    args = parser.parse_args()
    work = args.workdir.resolve()
    bids = work / "demo" / "bids"
    if not (bids / "participants.tsv").is_file():
        subprocess.run([str(BIN / "bids_postop-demo"), str(work / "demo"), "--dataset-only", "--participants",
                        str(args.participants)], check=True)
    labels = sorted(p.name[4:] for p in bids.glob("sub-*") if p.is_dir())
    common = ["--model", "demo", "-d", f"preop={bids / 'derivatives' / 'preop_masks'}", "--nprocs",
              str(args.nprocs), "--device", "cpu", "--skip-bids-validation"]
    results = {"participants": len(labels), "nprocs": args.nprocs, "load_before": os.getloadavg()[0]}
    for mode in ("sequential", "cohort"):
        out, scratch = work / f"out_{mode}", work / f"work_{mode}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        if mode == "cohort":
            wall, cpu, rc = timed([str(BIN / "bids_postop"), str(bids), str(out), "participant", "-w", str(scratch),
                               *common])
        else:  # one graph per participant, one after another in one process (what earlier versions did)
            loop = ("import sys\nfrom bids_postop.cli.run import main\n"
                    f"for label in {labels!r}:\n"
                    f"    main([{str(bids)!r}, {str(out)!r}, 'participant', '--participant-label', label, '-w', "
                    f"{str(scratch)!r} + '/' + label, *{common!r}])\n")
            wall, cpu, rc = timed([sys.executable, "-c", loop])
        finished = len(list(out.glob("sub-*/ses-*/*_measures.tsv")))
        results[mode] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                         "cpu_utilisation": round(cpu / wall / args.nprocs, 3), "exit_code": rc,
                         "participants_finished": finished}
        print(mode, results[mode], flush=True)
    if any(results[m]["participants_finished"] != len(labels) for m in ("sequential", "cohort")):
        print("not every participant finished: the timings are not comparable", file=sys.stderr)
    results["cohort_over_sequential_wall"] = round(results["cohort"]["wall_s"] / results["sequential"]["wall_s"], 3)
    results["load_after"] = os.getloadavg()[0]
    (work / "cohort.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
