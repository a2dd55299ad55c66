"""The pipelines behind the CLI: mine (search, evaluate, fine-tune), eval, finetune, compare."""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gemminer import __version__, distributed
from gemminer.checkpoint import Checkpointer, StopFlag
from gemminer.compact import mac_counts
from gemminer.config import RunConfig, load_run_config, merge, resolve, result_tree, to_dict
from gemminer.data import AUTO_EVAL_BATCH, Batches, Dataset, TensorData, load_dataset
from gemminer.errors import GemminerError
from gemminer.finetune import finetune
from gemminer.init import init_hash, initialize_weights
from gemminer.liveness import density_on_path
from gemminer.masking import prunable_names, remove_masks
from gemminer.methods import METHODS, method_class
from gemminer.models import build_model
from gemminer.runs import RunFolder, output_folder, summary_writer_class
from gemminer.seeding import make_generator
from gemminer.threads import auto_threads
from gemminer.ticket import Ticket, read_safetensors
from gemminer.train import Diverged, class_scores, enable_autocast, masked_accuracy, resolve_device


@dataclass
class Setup:
    """Everything a run needs that follows from its config: data, batches, initial model."""

    config: RunConfig
    device: torch.device
    dataset: Dataset
    model: nn.Module  # the initial weights, on `device`

    def batches(self, stream: str) -> Batches:
        """Shuffled, augmented training batches with their own seeded order and augmentation
        (BatchNorm recalibration gets them too: the statistics training sees)."""
        generator = make_generator(self.config.seed, stream)
        transform = self.dataset.transform(train=True, augment=self.config.data.augment,
                                           generator=make_generator(self.config.seed, f"{stream}-augment", self.device),
                                           channels_last=self.channels_last)
        return Batches(self.dataset.train, self.config.data.batch_size, shuffle=True, generator=generator,
                       transform=transform, rank=distributed.rank(), world_size=distributed.world_size())

    @property
    def test(self) -> Batches:
        """The evaluation split (test, or val with data.eval_split val), normalized, not augmented."""
        split = self.dataset.val if self.config.data.eval_split == "val" else self.dataset.test
        return Batches(split, self.config.data.eval_batch_size or AUTO_EVAL_BATCH.get(self.device.type, 256),
                       transform=self.dataset.transform(train=False, channels_last=self.channels_last))

    @property
    def channels_last(self) -> bool:
        """NHWC images and convolutions on CUDA only: on some CPUs (AVX2, torch 2.13) oneDNN's
        NHWC backward of a strided 1x1 convolution corrupts the heap."""
        return self.device.type == "cuda"

    @property
    def prunable(self) -> list[str]:
        return prunable_names(self.model, self.config.model.prune_first, self.config.model.prune_last)

    def at_init_accuracy(self, ticket: Ticket, model: nn.Module | None = None) -> float:
        """Accuracy of the untrained weights (or `model`'s) under `ticket`, BatchNorm recalibrated."""
        return masked_accuracy(self.model if model is None else model, ticket.masks, self.test,
                               self.batches("bn-recalibration"), self.config.bn_recalibration_batches)

    def density_on_path(self, ticket: Ticket) -> float | None:
        """The fraction of `ticket`'s kept weights on an input-to-output path of the model (`liveness`);
        None, with a warning saying why, where the model's graph cannot be analysed."""
        example = torch.zeros((1, *self.dataset.input_shape), device=self.device)
        return density_on_path(self.model, ticket.masks, example)

    def model_with(self, state: dict[str, torch.Tensor] | None) -> nn.Module:
        """The initial model, or a copy holding `state` (start weights) where one is given."""
        if state is None:
            return self.model
        model = copy.deepcopy(self.model)
        model.load_state_dict(state, strict=True)
        return model


def setup(config: RunConfig, init_state: dict[str, torch.Tensor] | None = None,
          weights_seed: int | None = None) -> Setup:
    """Load data and build the initial model (drawn from `weights_seed`, default the run's
    seed, or loaded from `init_state`). Under torchrun this joins the process group first."""
    weights_seed = config.seed if weights_seed is None else weights_seed
    device = distributed.init_from_env(resolve_device(config.device))
    check_bf16(config, device)
    data = config.data
    dataset = load_dataset(data.name, data.dir, data.num_samples, download=data.download, limit=data.limit,
                           val_size=data.val_size)
    torch.manual_seed(make_generator(weights_seed, "model").initial_seed())  # layers draw from the global RNG
    model = build_model(config.model.name, dataset.input_shape, dataset.num_classes,
                        affine_bn=config.model.affine_bn, bias=config.model.bias, width=config.model.width)
    names = prunable_names(model, config.model.prune_first, config.model.prune_last)
    if init_state is None:
        initialize_weights(model, names, config.model.weight_init, make_generator(weights_seed, "weights"))
    else:
        try:
            model.load_state_dict(init_state, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise GemminerError(f"initial weights do not fit model {config.model.name}: "
                                f"{' '.join(first[1:3]) if len(first) > 1 else first[0]}") from err
    # a run measured on the validation split (tuning) never touches the test split, not even to move it
    measured_on_val = data.eval_split == "val"
    check_output_shape(model, dataset, dataset.val if measured_on_val else dataset.test)
    apply_threads(config, model, dataset)
    dataset.train = dataset.train.to(device)  # once: batches are slices
    if not measured_on_val:
        dataset.test = dataset.test.to(device)
    dataset.val = dataset.val.to(device) if dataset.val is not None else None
    model = model.to(device)
    if device.type == "cuda" and any(isinstance(module, nn.Conv2d) for module in model.modules()):
        model = model.to(memory_format=torch.channels_last)  # and so do batches of images (Setup.channels_last)
    if config.bf16:
        enable_autocast(model, torch.bfloat16)
    return Setup(config, device, dataset, model)


def apply_threads(config: RunConfig, model: nn.Module, dataset: Dataset) -> int:
    """Set torch's CPU threads as `config.threads` says (`auto`: gemminer.threads, from the cores, the load and
    the size of a training step of this model); returns the count."""
    threads = config.threads
    if threads is None:
        from gemminer.report import layer_macs

        try:
            step = sum(layer_macs(model, dataset.input_shape).values()) * config.data.batch_size
        except Exception:  # a user's model the MAC count cannot follow: decide by the cores alone
            step = None
        threads = auto_threads(step)
    torch.set_num_threads(threads)
    return threads


def check_bf16(config: RunConfig, device: torch.device) -> None:
    """bf16 autocast asked for off CUDA is bad input."""
    if config.bf16 and device.type != "cuda":
        raise GemminerError(f"bf16 autocast is for CUDA devices; the device is {device}")


@torch.no_grad()
def check_output_shape(model: nn.Module, dataset: Dataset, split: TensorData | None = None) -> None:
    """One forward pass on two samples of `split` (default the test split), before any folder is
    written: a model that does not fit the data is bad input, not a failure in the middle of a search."""
    transform = dataset.transform() or (lambda inputs: inputs)
    was_training = model.training
    model.eval()
    try:
        logits = model(transform((dataset.test if split is None else split).x[:2]))
    except Exception as err:  # any shape or dtype mismatch inside a user's model
        raise GemminerError(f"model {type(model).__name__} fails on {dataset.name} inputs of shape "
                            f"{tuple(dataset.input_shape)}: {str(err).splitlines()[0]}") from err
    finally:
        model.train(was_training)
    if tuple(class_scores(logits).shape) != (2, dataset.num_classes):
        raise GemminerError(f"model output has shape {tuple(logits.shape[1:])} per sample; {dataset.name} needs "
                            f"({dataset.num_classes},) class scores")


@contextmanager
def run_session(config: RunConfig, out: str | Path, force: bool, resume: bool = True,
                initial_files: Callable[[RunFolder], None] | None = None
                ) -> Iterator[tuple[RunFolder, Checkpointer]]:
    """Open a run folder for training: refuse a finished run unless `force`; resume an
    unfinished one when its config matches; catch SIGINT/SIGTERM; drop the checkpoint
    when the body finishes. `initial_files` writes what a fresh run starts with. The folder
    is locked against a second writer for the whole session (`RunFolder.lock`)."""
    folder = RunFolder(output_folder(out), writer=distributed.is_main())
    with contextlib.ExitStack() as session:
        problem = None
        try:
            session.enter_context(folder.lock())  # rank 0 alone, before the folder is read, written or deleted
            if folder.finished and not force:
                raise GemminerError(f"{out} holds a finished run; pass --force to overwrite it")
            if config.tensorboard and folder.writer:
                summary_writer_class()  # before anything is written: a missing package is bad input
            resuming = resume and not force and folder.file("config.yaml").is_file()
            if resuming and folder.computed_nothing and folder.config_differences(config):
                resuming = False  # the earlier try stopped at bad input before computing anything: start over
            if resuming:
                folder.check_same_config(config)
            else:
                folder.start(config, force=force)  # after setup: bad input leaves no folder behind
                if initial_files is not None:
                    initial_files(folder)
            folder.open_tensorboard(config)
        except GemminerError as err:
            problem = err
        # every rank learns whether any refused (this also waits for rank 0's folder): all stop together
        message = distributed.first_problem(str(problem) if problem is not None else None)
        if problem is not None:
            raise problem
        if message is not None:
            raise GemminerError(message)
        with StopFlag() as stop:
            checkpoint = Checkpointer(folder.file("checkpoint.pt"), config.checkpoint_every, stop,
                                      is_writer=distributed.is_main(), barrier=distributed.barrier)
            distributed.barrier()  # every rank has read the checkpoint before rank 0 replaces it
            checkpoint.pipeline.setdefault("rows", [])
            if resuming and checkpoint.state:  # what the run wrote before its checkpoint must be as it wrote it
                folder.check_written(checkpoint.pipeline.get("files", {}))
            elif resuming and initial_files is not None:  # stopped before its first checkpoint: its start again
                initial_files(folder)
            folder.written.update(checkpoint.pipeline.get("files", {}))
            checkpoint.pipeline["files"] = folder.written  # one dict: every checkpoint saves the current digests
            if resuming:
                loop = checkpoint.state.get("loop") or {}
                folder.rewrite_metrics(checkpoint.pipeline["rows"] + loop.get("history", []))
                where = "the last completed phase" if checkpoint.state else "its start (no checkpoint was written yet)"
                if loop:
                    step = f", step {loop['partial']['steps']}" if loop.get("partial") else ""
                    where = f"{loop['phase']} epoch {loop['epoch'] + 1}{step}"
                if distributed.is_main():
                    print(f"resuming the unfinished run in {out} from {where}", file=sys.stderr)
            try:
                yield folder, checkpoint
            except Diverged as err:
                kept = folder.file("checkpoint.pt")
                message = f"{err}; the last good checkpoint is kept in {kept}" if kept.exists() else str(err)
                raise Diverged(message) from None
        if distributed.is_main():
            folder.file("checkpoint.pt").unlink(missing_ok=True)


def mine(config: RunConfig, out: str | Path, force: bool = False, progress: bool = True,
         resume: bool = True, observe: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Search, evaluate at init, fine-tune; write the run folder. Returns the summary.

    An unfinished run in `out` is resumed from its checkpoint when its config matches
    (`force` starts it over); a finished one is refused unless `force`. `observe` sees every
    metrics row after it is logged (tuning's pruner: it may raise to stop the run).
    """
    run = setup(config)
    method_cls = method_class(config.method)  # its options checked against the density and model before the folder
    method_cls(config.density, config.search, seed=config.seed, device=run.device)
    method_cls.check_model(config.search, run.model, run.prunable)
    init_files = lambda folder: folder.write_state(run.model.state_dict(), "init.safetensors")  # noqa: E731
    with run_session(config, out, force, resume, init_files) as (folder, checkpoint):
        if observe is not None:
            folder.log = _observed(folder.log, observe)
        return _mine_phases(config, run, folder, checkpoint, progress)


def _observed(log: Callable[[dict[str, Any]], None],
              observe: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def logged(row: dict[str, Any]) -> None:
        log(row)
        observe(row)

    return logged


def _mine_phases(config: RunConfig, run: Setup, folder: RunFolder, checkpoint: Checkpointer,
                 progress: bool) -> dict[str, Any]:
    pipeline = checkpoint.pipeline
    method_cls = method_class(config.method)
    if "search" not in pipeline:
        method = method_cls(
            config.density, config.search, seed=config.seed, device=run.device,
            prune_first=config.model.prune_first, prune_last=config.model.prune_last,
            progress=progress and distributed.is_main(), bn_recalibration_batches=config.bn_recalibration_batches,
            training=config.finetune, eval_every=config.eval_every, compile=config.compile)
        result = method.search(run.model, run.batches("search-order"), run.test, log=folder.log,
                               recalibration=run.batches("bn-recalibration"), checkpoint=checkpoint)
        write_search_files(config, folder, result)
        pipeline["search"] = {"epochs": result.epochs, "seconds": result.seconds, "start_point": result.start_point,
                              "summary": result.summary}
        pipeline["rows"] = list(result.history)  # the search is the first phase: its rows are all there are
        pipeline.pop("method_state", None)  # its files are written: the method's progress is not needed again
        checkpoint.save(None)  # the search is done: a resume starts at fine-tuning
    ticket = Ticket.load(folder.file("ticket.safetensors"))
    gem = Ticket.load(folder.file("gem.safetensors"))
    start = read_start(folder)
    collapsed = [layer.name for layer in ticket.layers() if layer.remaining == 0]
    if collapsed and distributed.is_main():
        warnings.warn(f"layer collapse: no weight left in {', '.join(collapsed)}", LayerCollapse, stacklevel=2)
    on_path = run.density_on_path(ticket)
    if on_path is not None and on_path < OFF_PATH_WARNING and distributed.is_main():
        warnings.warn(f"only {100 * on_path:.1f}% of the ticket's weights lie on an input-to-output path "
                      "(density_on_path); the rest cannot change the output", OffPath, stacklevel=2)

    start_model = run.model_with(start)
    acc_before = run.at_init_accuracy(gem, start_model)
    acc_ticket = acc_before if gem.same_masks(ticket) else run.at_init_accuracy(ticket, start_model)
    history, finetune_seconds = train_ticket(run, ticket, folder, progress, checkpoint, start_model,
                                             start_step_of(ticket))
    start_point = pipeline["search"].get("start_point", "init")
    summary = {
        "method": config.method, "data": config.data.name, "model": config.model.name, "seed": config.seed,
        "density_target": ticket.metadata["density_target"], "density_actual": ticket.density,
        "density_gem": gem.density,
        "acc_before_finetune": acc_before, "acc_ticket_at_init": acc_ticket,
        # only weights at initialization make an "at init" accuracy; IMP's rewound or trained ones do not
        "acc_before_finetune_weights": start_point, "acc_before_finetune_at_init": start_point == "init",
        "acc_after_finetune": history[-1]["test_acc"] if history else acc_ticket,
        "acc_best_finetune": max((row["test_acc"] for row in history if "test_acc" in row), default=acc_ticket),
        "epochs_to_ticket": pipeline["search"]["epochs"], "finetune_epochs": len(history),
        "search_seconds": pipeline["search"]["seconds"], "finetune_seconds": finetune_seconds,
        "weight_init": config.model.weight_init, "recipe": method_cls.recipe,
        "training": {key: value for key, value in to_dict(config.finetune).items()},
        "start_point": start_point, "start_step": start_step_of(ticket),
        "layer_collapse": collapsed, "density_on_path": on_path, "device": str(run.device),
        "processes": distributed.world_size(),
        "torch": torch.__version__, "gemminer": __version__, **thread_record(config),
        **mac_counts(run.model, ticket.masks, run.dataset.input_shape),
        **pipeline["search"].get("summary", {}),
    }
    folder.finish(summary)
    return summary


def thread_record(config: RunConfig) -> dict[str, Any]:
    """The CPU threads the run trained with, and what was asked (`auto` or a number): float sums in another
    order give other weights, so two runs' summaries say whether they can be bit-identical."""
    return {"threads": torch.get_num_threads(), "threads_requested": "auto" if config.threads is None
            else config.threads}


def _density_name(density: float) -> str:
    return f"d{density:g}"


def write_search_files(config: RunConfig, folder: RunFolder, result: Any) -> None:
    """The search's artifacts: ticket and gem; where the method made them, the start weights
    (start.safetensors), the ranking scores (scores.safetensors), a ticket per stop
    (tickets/d<density>.safetensors, with -start files where each has its own start) and
    tables (rounds.csv)."""
    # the config that decides the ticket, without the result-neutral keys: equal tickets stay byte-identical
    metadata = {"model": config.model.name, "data": config.data.name,
                "run_config": json.dumps(result_tree(config), sort_keys=True)}
    for ticket in (result.ticket, result.gem, *result.tickets.values()):
        ticket.metadata.update(metadata)
    folder.write_ticket(result.ticket, "ticket.safetensors")
    folder.write_ticket(result.gem, "gem.safetensors")
    if result.start_state is not None:
        folder.write_state(result.start_state, "start.safetensors")
    if result.scores is not None:
        folder.write_state(result.scores, "scores.safetensors")
    if result.tickets and folder.writer:
        folder.file("tickets").mkdir(exist_ok=True)
    for density, ticket in result.tickets.items():
        folder.write_ticket(ticket, f"tickets/{_density_name(density)}.safetensors")
        if density in result.start_states:
            folder.write_state(result.start_states[density], f"tickets/{_density_name(density)}-start.safetensors")
    for name, rows in result.tables.items():
        folder.write_table(rows, name)


def read_start(folder: RunFolder) -> dict[str, torch.Tensor] | None:
    """The run's start weights (start.safetensors), where its ticket does not train from init."""
    path = folder.file("start.safetensors")
    return read_safetensors(path, what="start weights")[0] if path.is_file() else None


def start_step_of(ticket: Ticket) -> int:
    """The optimizer step the ticket's training starts at (IMP after rewinding to epoch E)."""
    step = ticket.metadata.get("start_step", 0)
    return step if isinstance(step, int) else 0


# below this on-path density `mine` warns: most of the ticket's weights cannot affect the output
OFF_PATH_WARNING = 0.5


class LayerCollapse(UserWarning):
    """A ticket keeps no weight at all in some layer."""


class OffPath(UserWarning):
    """Most of a ticket's weights lie on no input-to-output path (`OFF_PATH_WARNING`)."""


def train_ticket(run: Setup, ticket: Ticket, folder: RunFolder, progress: bool,
                 checkpoint: Checkpointer | None = None, start_model: nn.Module | None = None,
                 start_step: int = 0) -> tuple[list[dict], float]:
    """Train `ticket` from the run's initial weights (or `start_model`'s, at `start_step` of
    the schedule: IMP's last round); save the trained sparse weights."""
    model = copy.deepcopy(run.model if start_model is None else start_model)
    ticket.apply(model)
    history = finetune(model, run.batches("finetune-order"), run.test, epochs=run.config.finetune.epochs,
                       config=run.config.finetune, log=folder.log, progress=progress and distributed.is_main(),
                       checkpoint=checkpoint, start_step=start_step, eval_every=run.config.eval_every,
                       compile=run.config.compile)
    folder.write_state(remove_masks(model).state_dict(), "finetuned.safetensors")
    return history, history[-1]["seconds"] if history else 0.0


def config_of_ticket(ticket: Ticket, overrides: dict[str, Any]) -> RunConfig:
    """The run config a ticket was found under (from its metadata), with `overrides`."""
    saved = ticket.metadata.get("run_config")
    base = json.loads(saved) if isinstance(saved, str) else (saved or {})
    if not base:
        base = {"data": {"name": ticket.metadata.get("data", "mnist1d")},
                "model": {"name": ticket.metadata.get("model")}}
    if overrides.get("method", base.get("method")) != base.get("method"):
        base.pop("search", None)  # another method's section need not parse under it
    # kept otherwise: the search's settings bind fine-tuning too (IMP trains its ticket as its last round,
    # for as many epochs as a round), and a preset's would replace the run's own
    return resolve(merge(base, overrides))


def load_run(run_dir: str | Path) -> tuple[RunConfig, Ticket, Ticket, dict[str, torch.Tensor]]:
    """Config, ticket, gem and initial weights of a run folder."""
    folder = RunFolder(run_dir)
    if not folder.file("config.yaml").is_file():
        raise GemminerError(f"{run_dir} is not a run folder (no config.yaml)")
    config = load_run_config(folder.file("config.yaml"))
    ticket = Ticket.load(folder.file("ticket.safetensors"))
    gem = Ticket.load(folder.file("gem.safetensors")) if folder.file("gem.safetensors").is_file() else ticket
    init, _ = read_safetensors(folder.file("init.safetensors"), what="initial weights")
    ticket.check_state(init, f"initial weights file {folder.file('init.safetensors')}")
    return config, ticket, gem, init


def evaluate_at_init(config: RunConfig, ticket: Ticket, gem: Ticket | None, init: dict[str, torch.Tensor],
                     strict: bool = False) -> dict[str, float]:
    """Recompute acc_ticket_at_init (and acc_before_finetune for a gem) as `mine` did."""
    run = setup(config, init_state=init)
    ticket.check(run.model, strict_init=strict)
    result = {"density_actual": ticket.density, "acc_ticket_at_init": run.at_init_accuracy(ticket)}
    if gem is not None:
        gem.check(run.model, strict_init=strict)
        result.update(density_gem=gem.density, acc_before_finetune=run.at_init_accuracy(gem))
    return result


def finetune_saved(config: RunConfig, ticket: Ticket, init: dict[str, torch.Tensor] | None, out: str | Path,
                   force: bool = False, strict: bool = False, progress: bool = True) -> dict[str, Any]:
    """Fine-tune a saved ticket into a new run folder (resumable like `mine`). Without
    `init`, the weights are drawn from the config's seed and init scheme (a warning
    says if they differ from the ticket's)."""
    # without --init, the weights are the ticket's own draw: its seed, whatever --seed says of the data order
    run = setup(config, init_state=init, weights_seed=_int_or_none(ticket.metadata.get("seed")))
    ticket.check(run.model, strict_init=strict)

    def initial_files(folder: RunFolder) -> None:
        folder.write_state(run.model.state_dict(), "init.safetensors")
        folder.write_ticket(ticket, "ticket.safetensors")

    # weights that are the ticket's start weights (IMP's rewind point) join its schedule where IMP did
    on_start_weights = ticket.metadata.get("start_hash") == init_hash(run.model)
    start_step = start_step_of(ticket) if on_start_weights else 0

    with run_session(config, out, force, True, initial_files) as (folder, checkpoint):
        acc_ticket = run.at_init_accuracy(ticket)
        history, seconds = train_ticket(run, ticket, folder, progress, checkpoint, start_step=start_step)
        method = ticket.metadata.get("method", "unknown")
        summary = {"method": method, "data": config.data.name,
                   "model": config.model.name, "seed": config.seed,
                   "density_target": ticket.metadata.get("density_target"), "density_actual": ticket.density,
                   "acc_ticket_at_init": acc_ticket,
                   "acc_after_finetune": history[-1]["test_acc"] if history else acc_ticket,
                   "finetune_epochs": len(history), "finetune_seconds": seconds,
                   "weight_init": config.model.weight_init,
                   "recipe": method_class(method).recipe if method in METHODS else None,
                   "training": to_dict(config.finetune), "start_step": start_step,
                   "start_point": ticket.metadata.get("start_point", "init") if on_start_weights else "init",
                   "device": str(run.device), "processes": distributed.world_size(), **thread_record(config),
                   **mac_counts(run.model, ticket.masks, run.dataset.input_shape)}
        folder.finish(summary)
    return summary


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None
