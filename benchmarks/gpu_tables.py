"""The GPU tables of docs/benchmarks.md, from the results a GPU check wrote (no GPU needed here).

    python benchmarks/gpu_tables.py benchmarks/gpu-results/h100-2026-11-26

The folder holds `gpu_check.json` (`bash benchmarks/gpu_check.sh`) and, where a full-length run was made,
`paper-run-metrics.csv` (a `gemminer mine` run's metrics.csv, possibly cut short by its time limit), and
`search_speed.txt` where `benchmarks/search_speed.py` ran there too (its JSON line), and `search_overhead*.txt`
where `benchmarks/search_overhead.py` did (JSON lines, each maybe after a label: `old {...}`).
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
    digests = [invocation["source_digest"] for invocation in report.get("invocations") or []
               if invocation.get("source_digest")]
    if digests:  # one per invocation (--only reruns may have run other code)
        lines[0] += f" Code: source digest {', '.join(dict.fromkeys(digests))}."
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
        search, dense = view.get("search_img_per_s"), view.get("dense_train_img_per_s")
        ratio = f"{dense / search:.2f}" if search and dense else "n/a"
        projected = view.get("projected_paper_run_min")
        lines.append(f"| {label} | {number(search)} | {number(dense)} | {number(view.get('eval_img_per_s'))} | "
                     f"{ratio} | {f'{projected:.1f} min' if projected is not None else 'n/a'} |")
    for label, key, source in (("bf16 over fp32", "bf16_speedup", speed),
                               ("`--compile` over eager", "compile_speedup", steps["compile"].get("details", {}))):
        up = source.get(key)
        if up:
            times = {key: f"{up[key]}x" if up.get(key) is not None else "n/a"
                     for key in ("search_img_per_s", "dense_train_img_per_s", "eval_img_per_s", "projected_paper_run")}
            lines.append(f"\nSpeed-up, {label}: search {times['search_img_per_s']}, dense training "
                         f"{times['dense_train_img_per_s']}, evaluation {times['eval_img_per_s']}, projected run "
                         f"{times['projected_paper_run']}.")
    evalbatch = steps.get("evalbatch", {}).get("details", {})
    if evalbatch.get("seconds_per_pass"):
        seconds = evalbatch["seconds_per_pass"]
        lines += ["", f"| evaluation batch ({evalbatch.get('model')}, {evalbatch.get('samples'):,} inputs) | "
                      + " | ".join(seconds) + " |", "|---|" + "---|" * len(seconds),
                  "| seconds per pass | " + " | ".join(f"{value:.4f}" for value in seconds.values()) + " |"]
    reference = steps.get("reference", {})
    if reference.get("status") == "ok":  # the opt-in step: what the JPEG CIFAR-10 copy costs
        view = reference.get("details", {})
        accuracy, published = view.get("acc_after_finetune"), view.get("published")
        gap = 100 * (published - accuracy) if accuracy is not None and published else None
        below = ("no comparison with" if gap is None else f"{gap:.2f} points below" if gap >= 0
                 else f"{-gap:.2f} points above")
        best = percent(view.get("acc_best_finetune"))
        lines += ["", f"Dense ResNet-20, {view.get('epochs')} epochs on {view.get('data')}: "
                      f"{percent(accuracy)} test accuracy after the last epoch (best {best}), "
                      f"{below} the published {percent(published)}; {view.get('wall_s')} s."]
    return "\n".join(lines)


def percent(value: float | None) -> str:
    return f"{100 * value:.2f}%" if value is not None else "n/a"


def number(value: float | None) -> str:
    """Thousands separated; n/a where the check could not measure it (an evaluation time within the noise)."""
    return f"{value:,.0f}" if value is not None else "n/a"


def overhead_table(path: Path) -> str:
    """One row per `search_overhead.py` line: the search's extra per step and its pieces."""
    lines = ["| run | model | masks | dense step ms | search step ms | search : dense | mask fwd+bwd ms | clamp ms "
             "| freezing event ms | epoch statistics ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for number, line in enumerate((text for text in path.read_text().splitlines() if "{" in text), start=1):
        label, _, payload = line.partition("{")
        row = json.loads("{" + payload)
        masks = "grouped" if row.get("grouped", False) else "layer by layer"
        lines.append(f"| {number}{' ' + label.strip() if label.strip() else ''} | {row['model']} | {masks} | "
                     f"{row['dense_step_ms']:.2f} | {row['search_step_ms']:.2f} | "
                     f"{row['search_over_dense_per_step']:.2f} | {row['masked_weights_ms']:.2f} | "
                     f"{row['clamp_ms']:.3f} | {row['freezing_event_ms']:.1f} | {row['epoch_statistics_ms']:.2f} |")
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
    speed = args.folder / "search_speed.txt"
    if speed.is_file():
        lines = [line for line in speed.read_text().splitlines() if line.startswith("{")]
        if lines:
            result = json.loads(lines[-1])
            print(f"\nsearch_speed.py ({result['model']}, {result['train_samples']:,} images per epoch, freezing "
                  f"every {result.get('freeze_period', 1)} epoch(s), {result['pairs']} pairs): search "
                  f"{result['search_s_per_epoch']} s/epoch, dense ({result.get('dense', 'unmasked')}) "
                  f"{result['dense_s_per_epoch']} s/epoch, ratio {result['ratio_median']} (upper 95% "
                  f"{result['ratio_upper95']}).")
    for path in sorted(args.folder.glob("search_overhead*.txt")):
        print(f"\n{path.name}:\n\n" + overhead_table(path))
    paper = args.folder / "paper-run-metrics.csv"
    if paper.is_file():
        print("\n" + paper_run_table(paper))
    return 0


if __name__ == "__main__":
    sys.exit(main())
