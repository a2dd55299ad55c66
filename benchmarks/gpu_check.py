"""The prepared GPU check: verify gemminer on one CUDA machine, then measure it.

    bash benchmarks/gpu_prepare.sh                      # first, where the data lies: fills gpu-carry/
    bash benchmarks/gpu_check.sh                        # on the GPU machine: one command, about 5 minutes
    bash benchmarks/gpu_check.sh --only resume,speed    # rerun chosen steps
    bash benchmarks/gpu_check.sh --only reference       # opt-in: what the JPEG CIFAR-10 copy costs (~5 min)
    bash benchmarks/gpu_check.sh --dry-run              # on CPU with every size shrunk (tests/test_gpu_check.py)

Steps, in priority order, correctness before speed (`STEPS`): smoke, setup, tests, mine, torchrun,
resume, speed, evalbatch, compile; then `reference`, which runs only when named (`--only reference`,
about 5 minutes more: dense ResNet-20 on the check's CIFAR-10 copy against the published accuracy).
Each step is a module of `benchmarks/gpu_steps/`; what they share is `gpu_steps/plumbing.py`.
A failing step is recorded with its error tail and the next one runs; a step
that would start with too little of the time budget left is skipped. The report
``$OUT/gpu_check.json`` (``./gpu-report/`` without $OUT) is rewritten as each step starts and ends,
so a check cut short still reports; ``gpu_check.log`` beside it holds every command's output.

Only the standard library is imported at the top: the smoke step must be able to report a PyTorch
that does not import. Every gemminer run is a subprocess (``python -m gemminer mine``), so what is
measured is what users run, whatever flags the checkout has.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: the gpu_steps package

from gpu_steps.compile import compile_problems, step_compile
from gpu_steps.evalbatch import step_evalbatch
from gpu_steps.mine import step_mine
from gpu_steps.plumbing import (
    CIFAR_ARCHIVE,
    DRY,
    GPU,
    MIN_STEP_SECONDS,
    OPT_IN,
    REPO,
    STEPS,
    Check,
    Report,
    StepFailed,
    StepSkipped,
    make_env,
    phase_timing,
    source_digest,
    tail,
)
from gpu_steps.reference import step_reference
from gpu_steps.resume import TOLERANCE, compare_metrics, step_resume, worker_gemminer
from gpu_steps.setup import step_setup
from gpu_steps.smoke import step_smoke
from gpu_steps.speed import step_speed
from gpu_steps.tests import step_tests
from gpu_steps.torchrun import step_torchrun, worker_ddp

__all__ = ["TOLERANCE", "compare_metrics", "compile_problems", "main", "phase_timing", "source_digest"]


STEP_FUNCTIONS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "smoke": step_smoke, "setup": step_setup, "tests": step_tests, "mine": step_mine, "torchrun": step_torchrun,
    "resume": step_resume, "speed": step_speed, "evalbatch": step_evalbatch, "compile": step_compile,
    "reference": step_reference}


WORKERS = {"_gemminer": worker_gemminer, "_ddp": worker_ddp}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="steps, in order: " + ", ".join(STEPS))
    parser.add_argument("--only", help="comma-separated steps to run (again); the report keeps the others")
    parser.add_argument("--dry-run", action="store_true", help="on CPU, every size shrunk")
    parser.add_argument("--out", help="report folder (default: $OUT, else ./gpu-report)")
    parser.add_argument("--work", help="scratch folder: data, runs, caches (default: $TMPDIR/gemminer-gpu-check)")
    parser.add_argument("--budget", type=float, help="seconds for the whole check (default 330, dry run 240; "
                                                     "plus 480, dry run 90, where --only names reference)")
    parser.add_argument("--source-digest", action="store_true",
                        help="print the digest of this checkout's code (a report's source_digest) and stop")
    parser.add_argument("--data-tar", help=f"the CIFAR-10 JPEG archive (default: gpu-carry/{CIFAR_ARCHIVE}, "
                                           f"else ../shared/data/{CIFAR_ARCHIVE})")
    args = parser.parse_args(argv)
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(STEPS))
        if unknown:
            parser.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in WORKERS:
        return WORKERS[argv[0]](argv[1:])
    args = parse_args(argv)
    if args.source_digest:
        print(source_digest())
        return 0
    sizes = DRY if args.dry_run else GPU
    planned = [name for name in STEPS if name in args.only.split(",")] if args.only else [
        name for name in STEPS if name not in OPT_IN]
    budget = args.budget or sizes.budget + sum(sizes.limits[name] for name in OPT_IN if name in planned)
    out = Path(args.out or os.environ.get("OUT") or REPO / "gpu-report")
    work = Path(args.work or os.environ.get("GPU_CHECK_WORK") or Path(tempfile.gettempdir()) / "gemminer-gpu-check")
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(sizes, args.dry_run, work, out, Path(args.data_tar) if args.data_tar else None,
                  deadline=time.monotonic() + budget)
    check.env = make_env(check)
    if not args.only:
        check.log_path.unlink(missing_ok=True)
    report = Report(out / "gpu_check.json", planned, args.dry_run, argv, budget, update=bool(args.only))
    print(f"[gpu_check] {'dry run, ' if args.dry_run else ''}steps {', '.join(planned)}; budget {budget:.0f} s; "
          f"report {report.path}", flush=True)
    incomplete = False
    for name in planned:
        check.step = name
        left = check.deadline - time.monotonic()
        if left < MIN_STEP_SECONDS:
            report.finish(name, "skipped", 0.0, {}, f"out of time: {left:.0f} s of the {budget:.0f} s budget left; "
                                                     f"rerun with --only {name}")
            print(f"[gpu_check] {name}: skipped (out of time)", flush=True)
            incomplete = True
            continue
        check.step_deadline = time.monotonic() + sizes.limits.get(name, budget)
        report.start(name)
        start = time.monotonic()
        details: dict[str, Any] = {}
        error = None
        try:
            details = STEP_FUNCTIONS[name](check)
            status = "ok"
        except StepSkipped as skipped:
            status, error = "skipped", str(skipped)
        except StepFailed as failed:
            status, error, details = "failed", tail(str(failed), 4000), failed.details
        except Exception as err:  # a bug in a step must not stop the next one
            status, error = "failed", tail(f"{type(err).__name__}: {err}\n{traceback.format_exc()}", 4000)
        finally:
            for job in check.jobs:  # nothing a step started outlives it
                if job.poll() is None:
                    job.stop()
                    job.process.wait()
                job.log()
            check.step_deadline = 0.0
        seconds = time.monotonic() - start
        report.finish(name, status, seconds, details, error)
        first_line = f": {error.strip().splitlines()[0]}" if error and error.strip() else ""
        print(f"[gpu_check] {name}: {status} ({seconds:.1f} s){first_line}", flush=True)
    summary = report.data["summary"]
    print("[gpu_check] " + json.dumps({key: value for key, value in summary.items() if value}), flush=True)
    failed = any(report.data["steps"][name]["status"] == "failed" for name in planned)
    return 1 if failed or incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
