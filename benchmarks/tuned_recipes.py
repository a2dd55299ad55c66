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


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _value(text: str | None) -> str:
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
    trials = _rows(folder / "trials.csv")
    params = [key for key in trials[0] if "." in key]
    label = folder.name.rsplit("-d", 1)[0]  # the study folder names the variant: imp-warmup-d0.005
    scored = [(folder / "trials.csv", "value", float(record["density"]))]
    scored += [(path, "stop_value", float(path.stem.split("-d", 1)[1])) for path in sorted(folder.glob("stops-d*.csv"))]
    out = []
    for path, column, density in scored:
        table = _rows(path)
        finished = [row for row in table if row["state"] in ("complete", "pruned")]
        complete = [row for row in table if row["state"] == "complete" and row[column] not in ("", None)]
        if not complete:
            raise SystemExit(f"error: {path} holds no complete trial")
        best = max(complete, key=lambda row: (float(row[column]), -int(row["number"])))
        pruned = len([row for row in finished if row["state"] == "pruned"])
        out.append({"study": folder.name, "method": f"{label} ({record['method']})", "density": f"{density:g}",
                    "finished": f"{len(finished)} ({pruned} pruned)",
                    "best": f"{100 * float(best[column]):.1f}", "trial": best["number"],
                    "values": ", ".join(f"{key} {_value(best[key])}" for key in params)})
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
            trials = _rows(folder / "trials.csv")
            params = [key for key in trials[0] if "." in key]
            print(f"\n{folder.name}:\n\n| trial | state | {' | '.join(params)} | val. acc. (%) | seconds |")
            print("|" + "---|" * (len(params) + 4))
            for row in trials:
                value = f"{100 * float(row['value']):.1f}" if row["value"] else "-"
                print(f"| {row['number']} | {row['state']} | {' | '.join(_value(row[key]) for key in params)} | "
                      f"{value} | {_value(row['seconds'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
