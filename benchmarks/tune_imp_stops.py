"""The IMP recipe at a higher density, from the trials of an IMP tuning study at a lower one.

IMP reaches every density of its path in one run: a trial tuned at 0.005 passes 0.02 on its way. When
the study is run with `--search-keep-densities 0.02`, each finished trial keeps its 0.02 ticket, and
training that ticket (on the same validation split) scores the trial's recipe at 0.02 without
running IMP's rounds again. With fewer trials than the TPE sampler's random start-up (10), the trials
are independent random draws, so picking the best of them at 0.02 is close to the random search a study
at 0.02 would have run (only the pruner's decisions, made at the lower density, differ).

    OMP_NUM_THREADS=1 python benchmarks/tune_imp_stops.py tuning/imp-warmup-d0.005 --density 0.02

Writes DIR/stops-d<density>/<trial>/ (a run folder per trained ticket), DIR/stops-d<density>.csv and
DIR/best-d<density>.yaml (the settings of the best complete trial at that density), and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import yaml
from tuned_recipes import number_text, read_rows, tuned_keys

from gemminer.compare import _train_stop
from gemminer.experiment import _density_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="the IMP tuning study's --out folder")
    parser.add_argument("--density", type=float, required=True, help="a density the trials kept on their path")
    args = parser.parse_args(argv)
    trials_csv = args.study / "trials.csv"
    best_yaml = args.study / "best.yaml"
    if not trials_csv.is_file() or not best_yaml.is_file():
        print(f"error: {args.study} holds no finished tuning study (trials.csv, best.yaml)", file=sys.stderr)
        return 2
    rows = read_rows(trials_csv)
    if not rows:
        print(f"error: {trials_csv} holds no trial", file=sys.stderr)
        return 2
    params = tuned_keys(rows)
    name = _density_name(args.density)
    out = args.study / f"stops-d{args.density:g}"
    table = []
    for row in rows:
        run = args.study / "trials" / f"{int(row['number']):04d}"
        if row["state"] != "complete":  # a pruned trial is no candidate, as in the study itself
            table.append({**row, "stop_value": None})
            continue
        if not (run / "tickets" / f"{name}.safetensors").is_file():
            print(f"error: trial {row['number']} kept no ticket at {args.density:g}; tune with "
                  f"--search-keep-densities {args.density:g}", file=sys.stderr)
            return 2
        summary = _train_stop(str(run), args.density, str(out / run.name), force=False, progress=False)
        table.append({**row, "stop_value": float(summary["acc_after_finetune"])})
        print(f"trial {row['number']}: val acc {table[-1]['stop_value']:.4f} at {args.density:g} "
              f"({row['value'][:6]} at the study's density)", flush=True)
    columns = ["number", "state", *params, "value", "stop_value"]
    with open(args.study / f"stops-d{args.density:g}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    scored = [row for row in table if row["stop_value"] is not None]
    if not scored:
        print(f"error: no complete trial in {args.study}", file=sys.stderr)
        return 2
    best = max(scored, key=lambda row: (row["stop_value"], -int(row["number"])))
    settings = yaml.safe_load(best_yaml.read_text())
    (settings.get("search") or {}).pop("keep_densities", None)  # how the trials were scored, not a setting
    for key in params:  # the best trial's values in place of the study's best
        section, field = key.split(".", 1)
        settings.setdefault(section, {})[field] = yaml.safe_load(best[key])  # a number or a choice, as typed
    (args.study / f"best-d{args.density:g}.yaml").write_text(
        f"# the best of {len(table)} trials scored at density {args.density:g} (trial {best['number']}, validation "
        f"accuracy {best['stop_value']:.4f})\n" + yaml.safe_dump(settings, sort_keys=False))
    heads = " | ".join(params)
    print(f"\n| trial | state | {heads} | val. acc. at the study's density | val. acc. at {args.density:g} |")
    print("|" + "---|" * (len(params) + 4))
    for row in table:
        values = " | ".join(number_text(row[key]) for key in params)
        at_study = f"{100 * float(row['value']):.1f}" if row["state"] == "complete" else "-"
        at_stop = f"{100 * row['stop_value']:.1f}" if row["stop_value"] is not None else "-"
        print(f"| {row['number']} | {row['state']} | {values} | {at_study} | {at_stop} |")
    print(f"\nbest at {args.density:g}: trial {best['number']} ({100 * best['stop_value']:.1f}%); written "
          f"{args.study / f'best-d{args.density:g}.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
