"""Seconds per training iteration of the toy world's stages, default layout vs channels-last.

Each stage is its own ``tools/train_net.py`` command exactly as ``tools/toy_world.py`` runs it
(the CLIP teacher at the full budget's batch of 256, the offline RPN, the RegionCLIP student,
transfer from the student), cut to ``--iters`` iterations, once with the default memory layout
and once with ``MODEL.CHANNELS_LAST True``, interleaved and repeated ``--repeats`` times. The
figure of a run is the trainer's own per-iteration time in its last ``metrics.json`` line (a
median over the iterations after the first); a row gives the median over the repeats and the
speed-up of channels-last over the default measured in the same run.

The stages need a toy world and its checkpoints: ``--run`` takes a seed folder of a toy-world
run (``OUT/seed_0``); without it a quick-budget run is built first (about 3 minutes). The quick
world's images have the full world's sizes, so the steps cost what they cost at the full budget.

Usage: python benchmarks/toy_world_steps.py [--run OUT/seed_0] [--iters 8] [--repeats 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import toy_world  # noqa: E402  (tools/ is not a package)

STAGES = ("teacher", "rpn", "student", "transfer_from_student")


def _set(argv, key, value):
    argv = list(argv)
    argv[argv.index(key) + 1] = value
    return argv


def stage_command(commands, stage, iters, channels_last, output_dir):
    argv = _set(_set(commands[stage], "SOLVER.MAX_ITER", str(iters)), "OUTPUT_DIR", output_dir)
    if stage.startswith("transfer"):
        argv += ["DATASETS.TEST", "()"]  # training steps only
    return argv + ["MODEL.CHANNELS_LAST", str(channels_last)]


def seconds_per_iteration(argv, output_dir) -> float:
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if '"time"' in line][-1]["time"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a toy-world seed folder (default: build a quick one)")
    parser.add_argument("--iters", type=int, default=8, help="iterations per timed run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        run = args.run
        if run is None:
            subprocess.run([sys.executable, os.path.join(ROOT, "tools", "toy_world.py"), "--out",
                            scratch, "--budget", "quick"], check=True, stdout=subprocess.DEVNULL)
            run = os.path.join(scratch, "seed_0")
        temperature = toy_world.teacher_temperature(f"{run}/teacher/model_final.pth")
        commands = toy_world.stages(run, f"{run}/world", toy_world.BUDGETS["full"], 0,
                                    temperature)
        times = {}
        for repeat in range(args.repeats):
            for stage in args.stages:
                for channels_last in (False, True):
                    out = os.path.join(scratch, f"{stage}_{channels_last}_{repeat}")
                    command = stage_command(commands, stage, args.iters, channels_last, out)
                    times.setdefault((stage, channels_last), []).append(
                        seconds_per_iteration(command, out))
    print(f"toy-world training steps, s/iter (median of {args.repeats} runs of {args.iters} "
          f"iterations), {os.cpu_count()} cores")
    print(f"{'stage':>22}  {'default':>8}  {'chan-last':>9}  {'speed-up':>8}")
    for stage in args.stages:
        default = statistics.median(times[stage, False])
        fast = statistics.median(times[stage, True])
        print(f"{stage:>22}  {default:8.2f}  {fast:9.2f}  {default / fast:7.2f}x")


if __name__ == "__main__":
    main()
