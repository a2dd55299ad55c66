"""One table of the best settings of several `gemminer tune` studies (their --out folders).

    python benchmarks/tuned_recipes.py tuning/*-d0.02 tuning/*-d0.005 [--trials]

For each study (named VARIANT-dDENSITY): the variant, method and density (from tune.yaml), the
finished trials (complete / pruned), the best validation accuracy and the tuned values of the best
trial; an IMP study scored at a higher density by `tune_imp_stops.py` adds a row per `stops-d*.csv`.
`--trials` also prints every trial of every study.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import yaml


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def tuned_keys(rows: list[dict[str, str]]) -> list[str]:
    """The tuned parameters of a trials.csv: its dotted columns (search.lr, finetune.lr, ...)."""
    return [key for key in rows[0] if "." in key]


def number_text(text: str | None) -> str:
    """A CSV cell as printed: numbers to 3 digits, anything else (a categorical choice) as it is."""
    if text in (None, ""):
        return "-"
    try:
        return f"{float(text):.3g}"
    except ValueError:
        return str(text)


def study_rows(folder: Path) -> list[dict[str, str]]:
    """The study's best trial (and each higher density scored on IMP's path), as table rows."""
    record = yaml.safe_load((folder / "tune.yaml").read_text())
    trials = read_rows(folder / "trials.csv")
    params = tuned_keys(trials)
    label = folder.name.rsplit("-d", 1)[0]  # the study folder names the variant: imp-warmup-d0.005
    scored = [(folder / "trials.csv", "value", float(record["density"]))]
    scored += [(path, "stop_value", float(path.stem.split("-d", 1)[1])) for path in sorted(folder.glob("stops-d*.csv"))]
    out = []
    for path, column, density in scored:
        table = read_rows(path)
        finished = [row for row in table if row["state"] in ("complete", "pruned")]
        complete = [row for row in table if row["state"] == "complete" and row[column] not in ("", None)]
        if not complete:
            raise SystemExit(f"error: {path} holds no complete trial")
        best = max(complete, key=lambda row: (float(row[column]), -int(row["number"])))
        pruned = len([row for row in finished if row["state"] == "pruned"])
        out.append({"study": folder.name, "method": f"{label} ({record['method']})", "density": f"{density:g}",
                    "finished": f"{len(finished)} ({pruned} pruned)",
                    "best": f"{100 * float(best[column]):.1f}", "trial": best["number"],
                    "values": ", ".join(f"{key} {number_text(best[key])}" for key in params)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", type=Path)
    parser.add_argument("--trials", action="store_true", help="also print every trial of every study")
    args = parser.parse_args(argv)
    args.studies = list(dict.fromkeys(args.studies))  # a folder named twice (a glob and a name) is one study
    missing = [str(folder) for folder in args.studies if not (folder / "trials.csv").is_file()]
    if missing:
        print(f"error: no finished tuning study in {', '.join(missing)}", file=sys.stderr)
        return 2
    print("| method | density | finished trials | best val. acc. (%) | best trial | tuned values |")
    print("|---|---|---|---|---|---|")
    for folder in args.studies:
        for row in study_rows(folder):
            print(f"| {row['method']} | {row['density']} | {row['finished']} | {row['best']} | {row['trial']} | "
                  f"{row['values']} |")
    if args.trials:
        for folder in args.studies:
            trials = read_rows(folder / "trials.csv")
            params = tuned_keys(trials)
            print(f"\n{folder.name}:\n\n| trial | state | {' | '.join(params)} | val. acc. (%) | seconds |")
            print("|" + "---|" * (len(params) + 4))
            for row in trials:
                value = f"{100 * float(row['value']):.1f}" if row["value"] else "-"
                print(f"| {row['number']} | {row['state']} | {' | '.join(number_text(row[key]) for key in params)} | "
                      f"{value} | {number_text(row['seconds'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
