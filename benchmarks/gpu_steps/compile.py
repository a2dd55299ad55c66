"""Step `compile`: the fp32 schedule with `--compile` against the eager one."""

from __future__ import annotations

from typing import Any

from gpu_steps.plumbing import (
    Check,
    StepFailed,
    StepSkipped,
    speed_of,
    speedups,
)


def step_compile(check: Check) -> dict[str, Any]:
    """The same fp32 run with --compile (one compiled configuration: compiling costs tens of seconds)."""
    if check.dry_run:
        raise StepSkipped("dry run: torch.compile is not exercised on CPU (tens of seconds per compile); on CUDA "
                          "this step runs the fp32 schedule with --compile against the eager one")
    compiled = check.mine_run("compile")  # first: a checkout without the flag fails at once
    details: dict[str, Any] = {}
    if not compiled.ok:
        message = compiled.job.failure("mine --compile")
        if "unrecognized arguments: --compile" in compiled.job.output:
            message = "this checkout's gemminer has no --compile flag yet\n" + message
        raise StepFailed(message, details)
    base = check.mine_run("fp32")  # the eager baseline, on this machine (the mine step's where it ran)
    details["compile"] = speed_of(check, compiled)
    details["compile"]["acc_after_finetune"] = compiled.summary().get("acc_after_finetune")
    if base.ok:
        details["fp32"] = {key: value for key, value in speed_of(check, base).items() if key != "timing"}
        details["fp32"]["acc_after_finetune"] = base.summary().get("acc_after_finetune")
        details["compile_speedup"] = speedups(details["fp32"], details["compile"])
    problems = compile_problems(compiled.job.output, details.get("compile_speedup"))
    if problems:
        raise StepFailed("; ".join(problems), details)
    return details


def compile_problems(output: str, speedup: dict[str, float | None] | None) -> list[str]:
    """What makes a compiled run that finished a failure: dynamo giving up on a frame (its recompile limit),
    or a compiled search slower than the eager one. A graph break at every layer still finishes, at a tenth
    of the speed, and was once reported "ok" so."""
    problems = []
    limits = sorted({line.strip() for line in output.splitlines() if "recompile_limit" in line})
    if limits:
        problems.append(f"torch._dynamo hit its recompile limit ({len(limits)} lines; the first: {limits[0][-160:]})"
                        " -- a graph break or a guard that fails every call; TORCH_LOGS=graph_breaks,recompiles")
    search = (speedup or {}).get("search_img_per_s")
    if search is not None and search < 1.0:
        problems.append(f"the compiled search ran at {search}x the eager one's images per second")
    return problems
