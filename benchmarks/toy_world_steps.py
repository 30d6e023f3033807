"""Seconds per training iteration of the toy world's stages, as run vs with other settings.

Each stage is its own ``tools/train_net.py`` command exactly as ``tools/toy_world.py`` runs it
(the CLIP teacher at the full budget's batch of 256, the offline RPN, the RegionCLIP student,
transfer from the student), cut to ``--iters`` iterations, once as the pipeline runs it and
once with the ``--against`` overrides added (default ``MODEL.CHANNELS_LAST True``; e.g.
``--against DATALOADER.NUM_WORKERS 1``), interleaved and repeated ``--repeats`` times. The
figure of a run is the trainer's own per-iteration time (data included) in its last
``metrics.json`` line (a median over the iterations after the first); a row gives the median
over the repeats and the speed-up of the overrides over the pipeline's command, measured in
the same run.

The stages need a toy world and its checkpoints: ``--run`` takes a seed folder of a toy-world
run (``OUT/seed_0``); without it a quick-budget run is built first (about 3 minutes). The quick
world's images have the full world's sizes, so the steps cost what they cost at the full budget.

Usage: python benchmarks/toy_world_steps.py [--run OUT/seed_0] [--iters 8] [--repeats 2]
                                           [--against KEY VALUE ...]
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

from _common import benchmark_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import toy_world  # noqa: E402  (tools/ is not a package)

STAGES = ("teacher", "rpn", "student", "transfer_from_student")


def _set(argv, key, value):
    argv = list(argv)
    argv[argv.index(key) + 1] = value
    return argv


def stage_command(commands, stage, iters, overrides, output_dir):
    argv = _set(_set(commands[stage], "SOLVER.MAX_ITER", str(iters)), "OUTPUT_DIR", output_dir)
    if stage.startswith("transfer"):
        argv += ["DATASETS.TEST", "()"]  # training steps only
    return argv + list(overrides)


def seconds_per_iteration(argv, output_dir) -> float:
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{result.stderr[-2000:]}")
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if '"time"' in line][-1]["time"]


def main(argv=None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--run", help="a toy-world seed folder (default: build a quick one)")
    parser.add_argument("--iters", type=int, default=8, help="iterations per timed run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--against", nargs="+", default=["MODEL.CHANNELS_LAST", "True"],
                        metavar="KEY VALUE", help="config overrides timed against the pipeline's "
                                                  "command")
    args = parser.parse_args(argv)
    if len(args.against) % 2:
        parser.error(f"--against takes KEY VALUE pairs, got {args.against}")
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
                for against in (False, True):
                    out = os.path.join(scratch, f"{stage}_{against}_{repeat}")
                    overrides = args.against if against else []
                    command = stage_command(commands, stage, args.iters, overrides, out)
                    times.setdefault((stage, against), []).append(
                        seconds_per_iteration(command, out))
    print(f"toy-world training steps, s/iter (median of {args.repeats} runs of {args.iters} "
          f"iterations), {os.cpu_count()} cores; against: {' '.join(args.against)}")
    print(f"{'stage':>22}  {'pipeline':>8}  {'against':>8}  {'speed-up':>8}")
    for stage in args.stages:
        default = statistics.median(times[stage, False])
        other = statistics.median(times[stage, True])
        print(f"{stage:>22}  {default:8.2f}  {other:8.2f}  {default / other:7.2f}x")


if __name__ == "__main__":
    main()
