"""Kill `engine train` with SIGKILL at random moments, resume each from its backup, and check
that every resumed run goes on at the backup's iteration + 1 with the learning rate the
uninterrupted run used at that iteration. Prints a table, one row per kill.

    python benchmarks/kill_and_resume.py --cfg cfg/mnist.cfg --kills 10 --backup-every 10

The uninterrupted run is run last, for as many iterations as the resumed runs reached.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

LINE = re.compile(r"^(\d+), [\d.]+: [\d.]+, [\d.]+ avg, ([\d.]+) rate")


def train_command(cfg, backup, every, extra=()):
    return [sys.executable, "-m", "engine.cli", "train", cfg, "--cpu", "--backup", backup,
            "--backup-every", str(every), *extra]


def first_lines(process, count):
    """The first `count` (iteration, rate) lines a training process prints."""
    found = []
    for line in process.stdout:
        match = LINE.match(line)
        if match:
            found.append((int(match.group(1)), match.group(2)))
            if len(found) == count:
                break
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", default="cfg/mnist.cfg")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--backup-every", type=int, default=10)
    parser.add_argument("--earliest", type=float, default=8.0, help="seconds after the start")
    parser.add_argument("--latest", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    base = os.path.splitext(os.path.basename(args.cfg))[0]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for trial in range(args.kills):
            backup = os.path.join(folder, f"run{trial}")
            moment = float(rng.uniform(args.earliest, args.latest))
            process = subprocess.Popen(train_command(args.cfg, backup, args.backup_every),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(moment)
            process.send_signal(signal.SIGKILL)
            process.wait()
            path = os.path.join(backup, f"{base}.backup")
            if not os.path.exists(path):
                rows.append((trial, moment, None, None, None))
                continue
            resumed = subprocess.Popen(train_command(args.cfg, backup, args.backup_every,
                                                     ("--weights", path)),
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            (iteration, rate), = first_lines(resumed, 1)
            resumed.kill()
            resumed.communicate()
            with open(path, "rb") as handle:
                seen = int.from_bytes(handle.read(20)[12:20], "little")
            rows.append((trial, moment, seen, iteration, rate))
            print(f"kill {trial}: at {moment:.1f} s, backup seen {seen}, resumed at {iteration}",
                  file=sys.stderr, flush=True)
        needed = max((r[3] for r in rows if r[3] is not None), default=0)
        reference = {}
        if needed:
            uninterrupted = subprocess.Popen(
                train_command(args.cfg, os.path.join(folder, "whole"), 100000),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            reference = dict(first_lines(uninterrupted, needed))
            uninterrupted.kill()
            uninterrupted.communicate()
    import engine

    batch = engine.load(args.cfg, quiet=True).options.batch_size
    print("| kill | moment (s) | backup iteration | resumed at | rate | uninterrupted rate | ok |")
    print("|---|---|---|---|---|---|---|")
    good = 0
    for trial, moment, seen, iteration, rate in rows:
        if seen is None:
            print(f"| {trial} | {moment:.1f} | no backup yet | - | - | - | - |")
            continue
        saved = seen // batch
        ok = iteration == saved + 1 and reference.get(iteration) == rate
        good += ok
        print(f"| {trial} | {moment:.1f} | {saved} | {iteration} | {rate} | "
              f"{reference.get(iteration)} | {'yes' if ok else 'NO'} |")
    print(f"{good} of {len(rows)} resumed at the backup's iteration + 1 with the uninterrupted "
          "run's learning rate")
    return 0 if good == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
