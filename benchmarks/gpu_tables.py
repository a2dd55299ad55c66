"""The GPU tables of BENCHMARKS.md, from what a GPU session brought back (no GPU needed here).

    python benchmarks/gpu_tables.py benchmarks/gpu-results/h200-2026-11-26

The folder holds `gpu_check.json` (`bash benchmarks/gpu_check.sh`) and, where a full-length run was made,
`paper-run-metrics.csv` (a `gemminer mine` run's metrics.csv, possibly cut short by its time limit).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from itertools import pairwise
from pathlib import Path
from typing import Any

PAPER_EPOCHS = 150  # search and fine-tuning each (ResNet-20 / CIFAR-10)


def check_tables(report: dict[str, Any]) -> str:
    steps = report["steps"]
    smoke = steps["smoke"].get("details", {})
    lines = [f"Card: {smoke.get('nvidia_smi', smoke.get('device_name', '?'))}; PyTorch {smoke.get('torch')}, "
             f"CUDA {smoke.get('cuda_version')}, cuDNN {smoke.get('cudnn')}, Python {smoke.get('python')}.", ""]
    lines += ["| step | status | seconds |", "|---|---|---|"]
    for name, entry in steps.items():
        detail = ""
        if name == "tests":
            detail = f" ({entry.get('details', {}).get('summary', '')})"
        lines.append(f"| {name} | {entry['status']}{detail} | {entry.get('seconds', '')} |")
    speed = steps["speed"].get("details", {})
    compiled = steps["compile"].get("details", {}).get("compile")
    variants = [(label, speed.get(key)) for label, key in (("eager fp32", "fp32"), ("eager bf16", "bf16"))]
    variants.append(("`--compile` fp32", compiled))
    lines += ["", "| ResNet-20, batch 128 | search img/s | dense training img/s | evaluation img/s "
                  "| search : dense per image | projected 150 + 150 epochs |", "|---|---|---|---|---|---|"]
    for label, view in variants:
        if not view:
            continue
        ratio = view["dense_train_img_per_s"] / view["search_img_per_s"]
        lines.append(f"| {label} | {view['search_img_per_s']:,.0f} | {view['dense_train_img_per_s']:,.0f} | "
                     f"{view['eval_img_per_s']:,.0f} | {ratio:.2f} | {view['projected_paper_run_min']:.1f} min |")
    for label, key, source in (("bf16 over fp32", "bf16_speedup", speed),
                               ("`--compile` over eager", "compile_speedup", steps["compile"].get("details", {}))):
        up = source.get(key)
        if up:
            lines.append(f"\nSpeed-up, {label}: search {up['search_img_per_s']}x, dense training "
                         f"{up['dense_train_img_per_s']}x, evaluation {up['eval_img_per_s']}x, projected run "
                         f"{up['projected_paper_run']}x.")
    return "\n".join(lines)


def paper_run_table(path: Path) -> str:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    lines = ["| phase | epochs done | first epoch s | median epoch s (evaluation included) | phase s "
             "| last test acc | best test acc |", "|---|---|---|---|---|---|---|"]
    medians = {}
    for phase in ("search", "finetune"):
        part = [row for row in rows if row["phase"] == phase]
        if not part:
            continue
        seconds = [float(row["seconds"]) for row in part]
        epochs = [seconds[0]] + [b - a for a, b in pairwise(seconds)]
        medians[phase] = (len(part), statistics.median(epochs[1:]) if len(epochs) > 1 else epochs[0])
        accuracies = [float(row["test_acc"]) for row in part if row.get("test_acc")]
        last, best = (f"{100 * accuracies[-1]:.2f}", f"{100 * max(accuracies):.2f}") if accuracies else ("", "")
        lines.append(f"| {phase} | {len(part)} | {epochs[0]:.1f} | {medians[phase][1]:.2f} | {seconds[-1]:.1f} | "
                     f"{last} | {best} |")
    if "finetune" not in medians and "search" in medians:  # stopped inside the search: count fine-tuning
        medians["finetune"] = (0, medians["search"][1])  # at a search epoch's time, an upper estimate
    missing = sum((PAPER_EPOCHS - done) * median for done, median in medians.values())
    if missing > 0:
        lines.append(f"\nEpochs not reached, at the median epoch time: {missing:.0f} s more.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    report_path = args.folder / "gpu_check.json"
    if not report_path.is_file():
        print(f"gpu_tables: no {report_path}", file=sys.stderr)
        return 2
    print(check_tables(json.loads(report_path.read_text())))
    paper = args.folder / "paper-run-metrics.csv"
    if paper.is_file():
        print("\n" + paper_run_table(paper))
    return 0


if __name__ == "__main__":
    sys.exit(main())
