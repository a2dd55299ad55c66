"""Step `resume`: SIGKILL mid-search and resume, against an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from gpu_steps.plumbing import (
    DRIVER,
    Check,
    Job,
    StepFailed,
    ensure_cifar,
    metric_rows,
    search_rows,
    tail,
)

# A killed and resumed run against an uninterrupted one on CUDA without deterministic algorithms
# (with them the check asks for bit-exact agreement). docs/runs.md states these.
TOLERANCE = {"ticket_iou": 0.95, "accuracy": 0.02, "loss_relative": 0.05, "density_gem": 0.01}


def step_resume(check: Check) -> dict[str, Any]:
    """SIGKILL mid-search and resume, against an uninterrupted run, twice: with deterministic
    algorithms (bit-exact expected) and without (within TOLERANCE). The three first runs go at once,
    then the two resumes: each is mostly start-up. On CPU (dry run) every run is deterministic, so
    the second pair is left out there."""
    ensure_cifar(check)
    base = check.work / "runs" / "resume"
    shutil.rmtree(base, ignore_errors=True)
    deterministic_env = {**check.env, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}

    def command(folder: Path, deterministic: bool) -> list[str]:
        if deterministic:
            return check.python(str(DRIVER), "_gemminer", "--deterministic", *check.small_flags(folder))
        return check.python("-m", "gemminer", *check.small_flags(folder))

    killed = ["deterministic"] if check.dry_run else ["deterministic", "default"]
    folders = {name: base / name for name in ["reference", *killed]}
    modes = {"reference": True, "deterministic": True, "default": False}
    env = {name: deterministic_env if modes[name] else check.env for name in folders}
    jobs = {name: Job(check, f"resume-{name}", command(folders[name], modes[name]), env[name]) for name in folders}
    limit = check.sizes.limits["resume"]
    killed_at: dict[str, int] = {}
    end = time.monotonic() + min(limit, check.remaining())
    while len(killed_at) < len(killed) and time.monotonic() < end:
        for name in killed:
            if name in killed_at:
                continue
            rows = search_rows(folders[name])
            if rows >= 2:
                jobs[name].kill()
                jobs[name].wait(30)
                killed_at[name] = rows
            elif jobs[name].poll() is not None:
                killed_at[name] = -1  # ended on its own
        time.sleep(0.005)
    details: dict[str, Any] = {"killed_after_search_rows": killed_at, "tolerance": TOLERANCE}
    if check.dry_run:
        details["default"] = "not run in a dry run: on CPU it is the deterministic run"
    for job in jobs.values():
        job.wait(limit)
    problems = []
    for name in killed:
        if jobs[name].process.returncode != -signal.SIGKILL:
            problems.append(jobs[name].failure(f"the {name} run was to be killed, but it"))
        elif (folders[name] / "summary.json").exists():
            problems.append(f"the killed {name} run has a summary.json")
    if not jobs["reference"].ok:
        problems.append(jobs["reference"].failure("the uninterrupted run"))
    if problems:
        raise StepFailed("\n".join(problems), details)
    resumed = {name: Job(check, f"resume-{name}-again", command(folders[name], modes[name]), env[name])
               for name in killed}
    for job in resumed.values():
        job.wait(limit)
    for name, job in resumed.items():
        if not job.ok:
            problems.append(job.failure(f"resuming the {name} run"))
        elif "resuming the unfinished run" not in job.output:
            problems.append(f"the {name} run started over instead of resuming:\n{tail(job.output, 600)}")
    if problems:
        raise StepFailed("\n".join(problems), details)
    reference_rows = metric_rows(folders["reference"])
    for name in killed:
        agreement = ticket_agreement(folders["reference"], folders[name])
        exact = compare_metrics(reference_rows, metric_rows(folders[name]), None)
        within = compare_metrics(reference_rows, metric_rows(folders[name]), TOLERANCE)
        details[name] = {**agreement, "metrics_identical": not exact, "metrics_differences": exact[:5],
                         "metrics_outside_tolerance": within[:5]}
        if name == "deterministic" and (not agreement["identical"] or exact):
            problems.append("with deterministic algorithms the resumed run is not bit-exact: ticket IoU "
                            f"{agreement['iou']}; {'; '.join(exact[:3]) or 'metrics identical'}")
        if name == "default" and (agreement["iou"] < TOLERANCE["ticket_iou"] or within):
            problems.append(f"without deterministic algorithms, outside the tolerance: ticket IoU {agreement['iou']}"
                            f" (>= {TOLERANCE['ticket_iou']}); {'; '.join(within[:3]) or 'metrics within'}")
    warnings = sorted({line.strip() for job in (jobs["reference"], resumed["deterministic"])
                       for line in job.output.splitlines() if "deterministic" in line and "Warning" in line})
    if warnings:
        details["nondeterministic_ops"] = warnings[:10]
    if problems:
        raise StepFailed("\n".join(problems), details)
    return details


def read_masks(path: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    return {name: mask.astype(bool) for name, mask in load_file(str(path)).items()}


def ticket_agreement(first: Path, second: Path) -> dict[str, Any]:
    a, b = read_masks(first / "ticket.safetensors"), read_masks(second / "ticket.safetensors")
    if a.keys() != b.keys():
        raise StepFailed(f"the tickets name different weights: {sorted(a.keys() ^ b.keys())[:5]}")
    both = sum(int((a[n] & b[n]).sum()) for n in a)
    either = sum(int((a[n] | b[n]).sum()) for n in a)
    return {"identical": all((a[n] == b[n]).all() for n in a), "iou": round(both / max(either, 1), 6),
            "kept": [sum(int(m.sum()) for m in a.values()), sum(int(m.sum()) for m in b.values())]}


def compare_metrics(reference: list[dict[str, str]], other: list[dict[str, str]],
                    tolerance: dict[str, float] | None) -> list[str]:
    """Differences between two metrics.csv (clock columns left out); `tolerance` None: exact."""
    problems = []
    if len(reference) != len(other):
        return [f"{len(reference)} rows against {len(other)}"]
    for index, (first, second) in enumerate(zip(reference, other, strict=True)):
        for key in sorted(set(first) | set(second)):
            if "second" in key:
                continue
            a, b = first.get(key, ""), second.get(key, "")
            if a == b:
                continue
            where = f"row {index + 1} ({first.get('phase')} {first.get('epoch')}) {key}: {a} vs {b}"
            if tolerance is None:
                problems.append(where)
                continue
            try:
                x, y = float(a), float(b)
            except ValueError:
                problems.append(where)
                continue
            if "acc" in key:
                bound = tolerance["accuracy"]
            elif "loss" in key:
                bound = tolerance["loss_relative"] * max(abs(x), abs(y), 1e-12)
            elif key == "density_gem":
                bound = tolerance["density_gem"]
            else:
                bound = 0.0
            if abs(x - y) > bound:
                problems.append(where)
    return problems


def worker_gemminer(argv: list[str]) -> int:
    """`gemminer` with deterministic algorithms on where asked (gemminer does not switch them on)."""
    if argv[:1] == ["--deterministic"]:
        argv = argv[1:]
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    from gemminer.cli import main

    return main(argv)
