"""Command line: ``gemminer mine | eval | finetune | compare | tune | sanity | report | export``.

Flags for every config field are generated from the dataclasses (``--search-reg-lambda``,
``--finetune-lr``, ...); the common ones have short names (``--density``, ``--epochs``).
Bad input prints one line ``gemminer: error: ...`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import typing
import warnings
from pathlib import Path
from typing import Any

from gemminer import distributed
from gemminer.allocator import keep_freed_memory
from gemminer.checkpoint import StopRequested
from gemminer.config import DataConfig, FinetuneConfig, ModelConfig, RunConfig, load_yaml, merge, resolve
from gemminer.errors import GemminerError, os_error_line

SECTION_CLASSES = {"data": DataConfig, "model": ModelConfig, "finetune": FinetuneConfig}
DEFAULTS_NOTE = ("Defaults shown are the paper's. With --preset auto (the default) a data set may replace some: "
                 "mnist1d searches 30 epochs, freeze period 2, lambda auto, lr 1.94, and Gem-Miner's ticket trains "
                 "at lr 0.2, weight decay 8.3e-5. config.yaml in the run folder holds every value used.")
THREADS_HELP = ("CPU threads of the tensor operations: auto (from the usable cores, how many are busy and the "
                "model's size, decided at start; see docs/robustness.md) | N")
SHORT_FLAGS = {("data", "name"): "--data", ("model", "name"): "--model", ("search", "epochs"): "--epochs",
               ("data", "download"): "--download"}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, not usage + message
        raise GemminerError(f"{message} (see {self.prog} --help)")


def _add_field_flags(group: argparse._ArgumentGroup, section: str | None, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for fld in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[fld.name]) or fld.name == "search":
            continue
        flag = SHORT_FLAGS.get((section, fld.name))
        if flag is None:
            flag = "--" + (f"{section}-" if section else "") + fld.name.replace("_", "-")
        dest = f"{section}.{fld.name}" if section else fld.name
        help_text = fld.metadata.get("help", "")
        default = fld.default if fld.default is not dataclasses.MISSING else None
        help_text += f" (default {default})" if default is not None else ""
        if hints[fld.name] is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=dest, default=None, metavar=fld.name.upper(), help=help_text)


def _add_config_flags(parser: argparse.ArgumentParser, method: str | None, top_level: bool = True) -> None:
    from gemminer.methods import method_class

    parser.add_argument("--config", metavar="FILE", help="YAML config; flags override it")
    if top_level:
        group = parser.add_argument_group("run")
        _add_field_flags(group, None, RunConfig)
        group.add_argument("--sparsity", type=float, default=None,
                           help="fraction of prunable weights removed (= 1 - density)")
    for section, cls in SECTION_CLASSES.items():
        _add_field_flags(parser.add_argument_group(section), section, cls)
    search = method_class(method).Config if method else None
    if search is not None and dataclasses.fields(search):
        _add_field_flags(parser.add_argument_group(f"search ({method})"), "search", search)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Nested dict of the flags given (unset flags are None and left out), over --config."""
    given: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if value is None or dest in ("config", "command", "sparsity") or dest.startswith("_"):
            continue
        if "." in dest:
            section, key = dest.split(".", 1)
            given.setdefault(section, {})[key] = value
        elif dest in {f.name for f in dataclasses.fields(RunConfig)}:
            given[dest] = value
    if getattr(args, "sparsity", None) is not None:
        if getattr(args, "density", None) is not None:
            raise GemminerError("give --density or --sparsity, not both")
        given["density"] = round(1 - args.sparsity, 12)  # 1 - 0.98 is 0.020000000000000018
        if not 0 <= args.sparsity < 1:
            raise GemminerError(f"sparsity must be in [0, 1), got {args.sparsity}")
    base = load_yaml(args.config) if getattr(args, "config", None) else {}
    return merge(base, given)


def _pre_method(argv: list[str]) -> str:
    """The method named on the command line or in --config (it decides the search flags)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.method:
        return known.method
    if known.config:
        return str(load_yaml(known.config).get("method", "gemminer"))
    return "gemminer"


class _Version(argparse.Action):
    """``--version``: print `version_line` and exit 0 (git runs only when asked)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from gemminer.runs import version_line

        print(version_line())
        parser.exit()


def build_parser(method: str = "gemminer") -> argparse.ArgumentParser:
    parser = Parser(prog="gemminer", description="Lottery tickets at initialization: Gem-Miner and baselines.")
    parser.add_argument("--version", action=_Version, help="print the version and the git commit, and exit")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    mine = commands.add_parser("mine", help="find a ticket, evaluate it at init, fine-tune it; write a run folder",
                               epilog=DEFAULTS_NOTE)
    mine.add_argument("--out", required=True, help="run folder")
    mine.add_argument("--force", action="store_true", help="start over, even on a finished or unfinished run")
    mine.add_argument("--resume", action="store_true",
                      help="resume the unfinished run in --out (the default when there is one; this flag makes "
                           "its absence an error)")
    mine.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(mine, method)

    evaluate = commands.add_parser("eval", help="accuracy of a ticket (and rare gem) at init, BN recalibrated")
    evaluate.add_argument("--run", help="run folder (its start weights where it has them: IMP's rewind point)")
    evaluate.add_argument("--ticket", help="ticket file (with --init)")
    evaluate.add_argument("--init", help="initial weights (safetensors)")
    evaluate.add_argument("--strict", action="store_true", help="initial-weight hash mismatch is an error")
    evaluate.add_argument("--data", dest="data.name", default=None, help="override the data set")
    evaluate.add_argument("--device", default=None, help="auto | cpu | cuda")

    tune = commands.add_parser("finetune", help="fine-tune a saved ticket from its initial weights")
    tune.add_argument("--ticket", help="ticket file")
    tune.add_argument("--init", help="initial weights (default: drawn from the ticket's config and seed)")
    tune.add_argument("--run", help="take ticket and initial weights (IMP: its start weights and step) from this "
                                    "run folder")
    tune.add_argument("--out", required=True, help="new run folder")
    tune.add_argument("--force", action="store_true", help="overwrite a finished run")
    tune.add_argument("--strict", action="store_true", help="initial-weight hash mismatch is an error")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    tune.add_argument("--epochs", dest="finetune.epochs", default=None, help="fine-tuning epochs")
    _add_config_flags(tune, None, top_level=False)
    tune.add_argument("--seed", default=None,
                      help="seed of the data order (without --init the weights are still drawn from the ticket's seed)")
    tune.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                      help="also log metrics to TensorBoard (needs tensorboard)")
    tune.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                      help="run training steps and evaluation under torch.compile (CUDA graphs on CUDA)")
    tune.add_argument("--device", default=None, help="auto | cpu | cuda")
    tune.add_argument("--threads", default=None, metavar="THREADS", help=THREADS_HELP)

    compare = commands.add_parser(
        "compare", help="a grid of variants x densities x seeds (plus dense training, sanity checks): results.csv, "
                        "results.md and plots; in parallel with --jobs or on Ray with --ray", epilog=DEFAULTS_NOTE)
    compare.add_argument("--out", default="runs/compare", help="folder for the runs and results (default %(default)s)")
    compare.add_argument("--grid", metavar="FILE", help="grid file: base settings, named variants, densities, seeds, "
                                                        "sanity checks (docs/compare.md); replaces the next four flags")
    compare.add_argument("--methods", default=None,
                         help="comma-separated methods, one variant each (default gemminer,random)")
    compare.add_argument("--densities", default=None, help="comma-separated densities (default 0.02)")
    compare.add_argument("--seeds", default=None, help="comma-separated seeds (default 0)")
    compare.add_argument("--sanity", default="shuffle",
                         help="sanity checks of the --sanity-variants (default %(default)s; 'none' for none)")
    compare.add_argument("--sanity-variants", default="gemminer", help="variants the checks run on (default gemminer)")
    compare.add_argument("--no-dense", action="store_true", help="skip the dense reference")
    compare.add_argument("--same-training", action="store_true",
                         help="train every variant's ticket with one recipe (the data set's dense training recipe, "
                              "with any --finetune-* flags): the comparison that isolates the mask")
    compare.add_argument("--jobs", type=int, default=1,
                         help="cells run at once in separate processes (default 1), each with its share of the CPU "
                              "threads (cores / jobs): the same tickets as a serial grid, but fine-tuned weights can "
                              "differ in the last bits (float sums in another order); summary.json records the "
                              "threads")
    compare.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                         help="run the cells as Ray tasks (a local Ray instance without ADDRESS; needs gemminer[ray])")
    compare.add_argument("--force", action="store_true", help="rerun finished runs")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(compare, "gemminer")

    tuning = commands.add_parser(
        "tune", help="tune a method's settings on the validation split (Optuna): best.yaml, trials.csv, plots",
        epilog="Every trial is a mine run measured on the --data-val-size split; the test split is not read. "
               "See docs/tuning.md.")
    tuning.add_argument("--out", required=True, help="study folder: tune.yaml, study.db or journal.log, trials/, "
                                                     "best.yaml, trials.csv, plots/")
    tuning.add_argument("--params", default=None,
                        help="comma-separated config keys to tune (default: the method's; see docs/tuning.md)")
    tuning.add_argument("--trials", type=int, default=20,
                        help="finished trials (complete or pruned) the study should hold; a rerun tops it up "
                             "(default %(default)s)")
    tuning.add_argument("--jobs", type=int, default=1,
                        help="processes running trials at once, on a journal file in --out (default %(default)s)")
    tuning.add_argument("--storage", default=None, metavar="URL",
                        help="database URL of a study shared by several machines (e.g. postgresql+psycopg://...)")
    tuning.add_argument("--study-name", default=None, help="study name (default: METHOD-dDENSITY)")
    tuning.add_argument("--sampler", default="tpe", help="tpe | random (default %(default)s)")
    tuning.add_argument("--pruner", default="median", help="median | none (default %(default)s)")
    tuning.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(tuning, method)

    check = commands.add_parser(
        "sanity", help="sanity checks of a finished run's ticket (Frankle et al. 2021): train its layerwise shuffle, "
                       "re-initialized weights, inverted ticket; print each one's drop")
    check.add_argument("--run", required=True, help="finished run folder")
    check.add_argument("--checks", default="shuffle,reinit,invert",
                       help="comma-separated: shuffle, reinit, invert (default %(default)s)")
    check.add_argument("--force", action="store_true", help="retrain finished variants")
    check.add_argument("--quiet", action="store_true", help="no progress bars")
    check.add_argument("--threads", default=None, metavar="THREADS", help=THREADS_HELP + " (default: the run's)")

    report = commands.add_parser(
        "report", help="per-layer table (shape, parameters, remaining, density, MACs remaining) and a density PNG")
    report.add_argument("ticket", help="run folder (MACs need its config) or ticket file")
    report.add_argument("--png", help="density chart (default: layer_density.png in the run folder, or beside "
                                      "the ticket file)")

    export = commands.add_parser("export", help="write a run's model with pruned weights 0: dense, or sparse (CSR)")
    export.add_argument("--run", required=True, help="run folder")
    export.add_argument("--format", default="dense",
                        help="dense | sparse | compact (dead channels removed) | mnn (MNN runtime, sparse weights; the "
                             "mnn extra) (default %(default)s)")
    export.add_argument("--weights", default="finetuned",
                        help="finetuned | init | start (IMP's rewind point) (default %(default)s)")
    export.add_argument("--out", help="file (default: <run>/export-<weights>-<format>.safetensors, .mnn for mnn)")
    export.add_argument("--verify", action="store_true",
                        help="run the export beside the masked model on test samples; exit 1 above --tolerance")
    export.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest output difference allowed, relative to the largest output (default %(default)s)")
    export.add_argument("--verify-samples", type=int, default=256, help="test samples to verify on (default "
                                                                         "%(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # CPU steps without page-faulting their activations in again (gemminer.allocator)
    try:
        args = build_parser(_pre_method(argv)).parse_args(argv)
        args.argv = argv  # for the provenance line of compare's tables
        return COMMANDS[args.command](args)
    except GemminerError as err:
        print(f"gemminer: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file the command writes or reads that no guard named: still one line
        if os.environ.get("GEMMINER_DEBUG"):
            raise
        print(f"gemminer: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except StopRequested as stop:
        print(f"gemminer: stopped by {stop.signal_name} after writing a checkpoint; run the same command again "
              "to resume", file=sys.stderr)
        return 130 if stop.signal_name == "SIGINT" else 143
    except KeyboardInterrupt:
        print("gemminer: interrupted; the run folder has no summary.json and counts as unfinished", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


def _print_summary(summary: dict[str, Any]) -> None:
    keys = ["method", "density_target", "density_actual", "density_gem", "acc_before_finetune",
            "acc_ticket_at_init", "acc_after_finetune", "epochs_to_ticket", "search_seconds", "finetune_seconds"]
    for key in keys:
        if key in summary:
            value = summary[key]
            print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")


def cmd_mine(args: argparse.Namespace) -> int:
    from gemminer.experiment import mine

    config = resolve(_overrides(args))
    if args.resume and not (Path(args.out) / "config.yaml").is_file():
        raise GemminerError(f"nothing to resume in {args.out} (no unfinished run there)")
    summary = mine(config, args.out, force=args.force, progress=not args.quiet)
    if not distributed.is_main():
        return 0
    _print_summary(summary)
    print(f"run folder: {args.out}")
    return 0


def _ticket_and_init(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    from gemminer.experiment import load_run
    from gemminer.ticket import Ticket, read_safetensors

    if args.run:
        from gemminer.experiment import read_start
        from gemminer.runs import RunFolder

        config, ticket, gem, init = load_run(args.run)
        start = read_start(RunFolder(args.run))  # IMP: the ticket trains (and is measured) from these
        return config, ticket, gem, init if start is None else start
    if not args.ticket:
        raise GemminerError("give --run DIR, or --ticket FILE (with --init FILE)")
    ticket = Ticket.load(args.ticket)
    init = read_safetensors(args.init, what="initial weights")[0] if args.init else None
    return None, ticket, None, init


def cmd_eval(args: argparse.Namespace) -> int:
    from gemminer.experiment import config_of_ticket, evaluate_at_init

    config, ticket, gem, init = _ticket_and_init(args)
    if init is None:
        raise GemminerError("eval needs the initial weights: --init FILE (or --run DIR)")
    overrides = {key: value for key, value in {"device": args.device}.items() if value}
    if getattr(args, "data.name"):
        overrides["data"] = {"name": getattr(args, "data.name")}
    if config is None:
        config = config_of_ticket(ticket, overrides)
    elif overrides:
        config = resolve(merge(dataclasses.asdict(config), overrides))
    result = evaluate_at_init(config, ticket, gem, init, strict=args.strict)
    print(json.dumps(result, indent=2))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from gemminer.experiment import config_of_ticket, finetune_saved

    _, ticket, _, init = _ticket_and_init(args)
    overrides = _overrides(args)
    config = config_of_ticket(ticket, {key: value for key, value in overrides.items() if key != "search"})
    summary = finetune_saved(config, ticket, init, args.out, force=args.force, strict=args.strict,
                             progress=not args.quiet)
    if not distributed.is_main():
        return 0
    _print_summary(summary)
    print(f"run folder: {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from gemminer.compare import compare
    from gemminer.grid import grid_from_flags, load_grid

    for flag, instead in (("density", "--densities"), ("sparsity", "--densities"), ("seed", "--seeds"),
                          ("method", "--methods")):
        if getattr(args, flag, None) is not None:
            raise GemminerError(f"compare takes {instead}, not --{flag}")
    if args.jobs < 1:
        raise GemminerError(f"--jobs must be >= 1, got {args.jobs}")
    if args.grid:
        # given at all, even at its default value: a grid file's own seeds and densities are not overridden
        given = [flag for flag in ("--methods", "--densities", "--seeds") if getattr(args, flag[2:]) is not None]
        if given:
            raise GemminerError(f"--grid FILE sets variants, densities and seeds; drop {', '.join(given)}")
        grid = load_grid(args.grid)
        flags = _overrides(args)
        if flags.get("search"):
            raise GemminerError("with --grid, a method's options go in its variant (search: ...), not --search-* flags")
        if flags:  # flags and --config refine the grid's base settings
            from gemminer.config import merge

            grid.base = merge(grid.base, flags)
        grid.same_training = grid.same_training or args.same_training
        grid.dense = grid.dense and not args.no_dense
        grid.validate()
    else:
        methods = [m.strip() for m in (args.methods or "gemminer,random").split(",") if m.strip()]
        dense = not args.no_dense
        if "dense" in methods:
            methods.remove("dense")
            dense = True
        densities = [_number(d, "density", float) for d in (args.densities or "0.02").split(",")]
        seeds = [_number(s, "seed", int) for s in (args.seeds or "0").split(",")]
        checks = [] if args.sanity.strip() in ("", "none") else [c.strip() for c in args.sanity.split(",")]
        grid = grid_from_flags(_overrides(args), methods, densities, seeds, dense=dense,
                               same_training=args.same_training, sanity=checks,
                               sanity_variants=[v.strip() for v in args.sanity_variants.split(",")])
    report = print if distributed.is_main() and not args.quiet else None
    table = compare(grid, args.out, jobs=args.jobs, ray_address=args.ray, force=args.force,
                    progress=not args.quiet, report=report, command=shlex.join(["gemminer", *args.argv]))
    if distributed.is_main():
        print(table)
        print(f"results: {Path(args.out) / 'results.md'}, {Path(args.out) / 'results.csv'}, {Path(args.out) / 'plots'}")
    return 0


def _number(text: str, what: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise GemminerError(f"bad {what} {text!r} in list") from None


def cmd_tune(args: argparse.Namespace) -> int:
    from gemminer.tune import tune

    params = [name.strip() for name in args.params.split(",") if name.strip()] if args.params else None
    result = tune(_overrides(args), args.out, params=params, trials=args.trials, jobs=args.jobs,
                  storage=args.storage, study_name=args.study_name, sampler=args.sampler, pruner=args.pruner,
                  progress=not args.quiet)
    if result.best_value is None:
        print(f"{result.finished} finished trials, none complete: no best settings yet")
    else:
        settings = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                             for key, value in result.best_params.items())
        print(f"best of {result.finished} finished trials: validation accuracy {result.best_value:.4f} ({settings})")
    print("written: " + ", ".join(str(path) for path in result.files))
    return 0


def cmd_sanity(args: argparse.Namespace) -> int:
    from gemminer.sanity import sanity

    report = print if distributed.is_main() else None
    sanity(args.run, args.checks, force=args.force, progress=not args.quiet, report=report, threads=args.threads)
    if distributed.is_main():
        print(f"written: {Path(args.run) / 'sanity.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from gemminer.report import plot_layer_density
    from gemminer.ticket import Ticket

    path = Path(args.ticket)
    macs = None
    if not path.exists():
        raise GemminerError(f"nothing at {path}: report takes a run folder or a ticket file")
    if path.is_dir():
        from gemminer.experiment import load_run, setup
        from gemminer.report import layer_macs

        config, ticket, _, init = load_run(path)
        run = setup(config, init_state=init)
        macs = layer_macs(run.model, run.dataset.input_shape)
        on_path = run.density_on_path(ticket)
        png = Path(args.png) if args.png else path / "layer_density.png"
    else:
        ticket = Ticket.load(path)
        png = Path(args.png) if args.png else path.with_name(path.stem + "-density.png")
    # first: a chart that cannot be written (or would land on a run's own file) is one line, before the table
    chart = plot_layer_density(ticket, png, inputs=[path])
    print(ticket.layer_report(macs))
    if path.is_dir():
        shown = "unknown (the model's graph could not be analysed)" if on_path is None else f"{on_path:.4f}"
        print(f"density on path: {shown} (fraction of the kept weights on an input-to-output path)")
    print(f"density chart: {chart}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gemminer.export import export_run

    if args.verify and (args.tolerance < 0 or args.verify_samples < 1):
        raise GemminerError("--verify needs --tolerance >= 0 and --verify-samples >= 1")
    path = export_run(args.run, args.format, args.weights, args.out)
    print(f"{args.format} export of the {args.weights} weights: {path} ({path.stat().st_size} bytes)")
    if args.format == "compact":
        from gemminer.compact import describe

        print(describe(path))
    if not args.verify:
        return 0
    from gemminer.verify import verify_export

    result = verify_export(args.run, path, args.tolerance, args.verify_samples)
    print("\n".join(result.lines()))
    return 0 if result.ok else 1


COMMANDS = {"mine": cmd_mine, "eval": cmd_eval, "finetune": cmd_finetune, "compare": cmd_compare,
            "tune": cmd_tune, "sanity": cmd_sanity, "report": cmd_report, "export": cmd_export}


_PACKAGE = Path(__file__).resolve().parent
_python_warning_format = warnings.formatwarning


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  line: str | None = None) -> str:
    """gemminer's own warnings as one line for a command-line user (``gemminer: warning: ...``), not a
    source location and a line of gemminer's code; other libraries' keep Python's form."""
    if category.__module__.startswith("gemminer") or Path(filename).resolve().is_relative_to(_PACKAGE):
        return f"gemminer: warning: {message}\n"
    return _python_warning_format(message, category, filename, lineno, line)


def entry_point() -> None:
    warnings.simplefilter("once")  # a warning repeated by several steps of a command is said once
    warnings.formatwarning = _warning_line
    sys.exit(main())
