"""--compile on CPU (inductor): a tiny Gem-Miner run searched and fine-tuned compiled finds the eager
run's ticket and accuracies; the compiled graphs are a fixed few per training loop (none per step or
epoch: not the last partial batch, BatchNorm recalibration, freezing events or the lr schedule); and
compiled forward passes see masks changed in place. (On CUDA, benchmarks/gpu_check.sh's compile
step runs `mine --compile` against the eager run.)"""

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from gemminer.config import RESULT_NEUTRAL, resolve
from gemminer.experiment import mine
from gemminer.masking import (
    GlobalTopK,
    ScoreMask,
    TopKScoreMask,
    attach,
    attach_score_masks,
    like_weight,
    prunable_names,
)
from gemminer.methods.gemminer import freeze_lowest
from gemminer.models import build_model
from gemminer.runs import RunFolder
from gemminer.ticket import Ticket
from gemminer.train import compiled, forward
from tests.conftest import tiny_overrides

# inductor's own imports use torch.jit.script_method, deprecated in this torch
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

# 800 training samples in batches of 64: every epoch ends on a partial batch of 32
RUN = {"density": 0.1, "data": {"num_samples": 1000}, "model": {"width": 16},
       "search": {"epochs": 6, "freeze_period": 2, "reg_lambda": 3e-4},  # auto is refused with compile
       "finetune": {"epochs": 4, "lr": 0.1}}


@pytest.fixture(scope="module", autouse=True)
def _compile_in_process():
    # inductor compiles in this process, on one thread: on a busy 2-core machine, a pool of compile
    # workers and two OpenMP threads took this file from 1m09s to 3m13s of CPU time (cold caches)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's per-test fixture, for this module's shared runs too
    try:
        with torch._inductor.config.patch(compile_threads=1):
            yield
    finally:
        torch.set_num_threads(threads)


def overlap(first: Ticket, second: Ticket) -> float:
    """Intersection over union of the kept weights."""
    both = sum(int((first.masks[n] & second.masks[n]).sum()) for n in first.masks)
    either = sum(int((first.masks[n] | second.masks[n]).sum()) for n in first.masks)
    return both / either


@pytest.fixture(scope="module")
def runs(_compile_in_process, tmp_path_factory, data_dir):
    """Eager seeds 0 and 1, and seed 0 compiled. The compiled run records the number of compiled graphs
    at each metrics row, and from the end of each loop's first epoch to its last, a recompile fails it
    (`torch.compiler.set_stance("fail_on_recompile")`)."""
    out = tmp_path_factory.mktemp("compile")
    last = {"search": RUN["search"]["epochs"], "finetune": RUN["finetune"]["epochs"]}
    result = {}
    for name, seed, compile in (("eager", 0, False), ("seed1", 1, False), ("compiled", 0, True)):
        graphs: list[tuple[str, int]] = []
        log = RunFolder.log

        def watching(folder, row, log=log, graphs=graphs, compile=compile):
            graphs.append((row["phase"], counters["stats"]["unique_graphs"]))
            if compile:  # the next loop's first epoch compiles its own graphs
                torch.compiler.set_stance("default" if row["epoch"] == last[row["phase"]] else "fail_on_recompile")
            return log(folder, row)

        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(RunFolder, "log", watching)
                overrides = tiny_overrides(data_dir, seed=seed, compile=compile, device="cpu", **RUN)
                summary = mine(resolve(overrides), out / name, progress=False)
        finally:
            torch.compiler.set_stance("default")
        result[name] = (summary, Ticket.load(out / name / "ticket.safetensors"), graphs)
    return result


def test_compiled_run_finds_the_eager_ticket(runs):
    same_seed = overlap(runs["eager"][1], runs["compiled"][1])
    other_seed = overlap(runs["eager"][1], runs["seed1"][1])
    print(f"kept-set IoU: compiled vs eager {same_seed:.4f}, eager seed 0 vs seed 1 {other_seed:.4f}")
    assert same_seed >= 0.95
    assert same_seed - other_seed >= 0.5  # far above what another seed shares (about density / (2 - density))
    eager, compiled_summary = runs["eager"][0], runs["compiled"][0]
    for key in ("acc_before_finetune", "acc_ticket_at_init", "acc_after_finetune"):
        assert abs(eager[key] - compiled_summary[key]) <= 0.01, (key, eager[key], compiled_summary[key])
    assert "compile" in RESULT_NEUTRAL  # what this test shows: a resume or grid cell may change it


def test_compiled_graphs_are_a_few_per_loop_and_none_after_the_first_epoch(runs):
    graphs = runs["compiled"][2]
    assert {phase for phase, _ in graphs} == {"search", "finetune"}
    before = runs["seed1"][2][-1][1]  # the eager runs compile nothing
    for phase in ("search", "finetune"):
        counts = [count for name, count in graphs if name == phase]
        # epoch 1 compiled every graph there is: the training batch, evaluation and the optimizer step,
        # not the partial last batch (eager); later epochs (freezing events, lr changes, BatchNorm
        # recalibration) none (and a recompile would have failed the run)
        assert counts[0] == counts[-1] and len(counts) == RUN[phase]["epochs"], (phase, counts)
        assert 0 < counts[0] - before <= 3, (phase, counts[0] - before)
        before = counts[-1]


def test_compiled_forward_sees_masks_changed_in_place():
    torch.manual_seed(0)
    net = build_model("cnn1d", (1, 40), 10, width=4)
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    masks = list(attach(net, prunable_names(net), lambda name, weight: ScoreMask(torch.rand(weight.shape))).values())
    inputs = torch.randn(8, 1, 40)
    optimizer = torch.optim.SGD([m.scores for m in masks], lr=0.1)
    net.eval()
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad(), compiled(net, optimizer):
        before = forward(net, inputs)
        assert counters["stats"]["unique_graphs"] == graphs + 1  # the compiled forward ran
        assert torch.allclose(before, net(inputs), atol=1e-5)
        freeze_lowest(masks, keep=sum(m.alive.numel() for m in masks) // 4)  # a freezing event
        after = forward(net, inputs)
        assert torch.allclose(after, net(inputs), atol=1e-5)
        assert not torch.allclose(after, before, atol=1e-3)


def test_channels_last_masks_compile_into_one_graph():
    """Scores in the weights' channels_last layout (as on CUDA) trace without a graph break: an `out=` into a
    non-contiguous tensor broke the graph at every layer, and a compiled ResNet-20 search on an H100 ran at a
    tenth of its speed. fullgraph=True raises at any break; the values and score gradients are eager's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 3, bias=False),
                        nn.Flatten()).to(memory_format=torch.channels_last)
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    masks = list(attach_score_masks(net, prunable_names(net), lambda name, weight: ScoreMask(
        like_weight(torch.rand(weight.shape), weight))).values())
    assert masks[0].scores.is_contiguous(memory_format=torch.channels_last)
    inputs = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    results = []
    for run in (torch.compile(net, fullgraph=True), net):
        out = run(inputs)
        out.square().sum().backward()
        results.append((out.detach(), [mask.scores.grad.clone() for mask in masks]))
        for mask in masks:
            mask.scores.grad = None
    (compiled_out, compiled_grads), (eager_out, eager_grads) = results
    assert torch.allclose(compiled_out, eager_out, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(compiled_grads, eager_grads, strict=True))


def test_compiled_edge_popup_masks_select_what_eager_ones_do():
    """Per-layer and global top-k (GlobalTopK): ranked inside the graph on every call, no cache."""
    torch.manual_seed(0)
    nets, masks = [], []
    for shared in (None, GlobalTopK(60)):
        net = nn.Sequential(nn.Linear(12, 10, bias=False), nn.ReLU(), nn.Linear(10, 4, bias=False))
        layers = {name: TopKScoreMask(torch.randn(net.get_submodule(name.split(".")[0]).weight.shape),
                                      None if shared else 30, shared) for name in prunable_names(net)}
        attach(net, list(layers), lambda name, weight, layers=layers: layers[name])
        nets.append(net)
        masks += layers.values()

    def masked() -> list[torch.Tensor]:
        return [net[index].weight for net in nets for index in (0, 2)]

    compiled_masked = torch.compile(masked)
    for _ in range(2):  # the scores change between calls: the compiled graph ranks them again
        assert all(torch.equal(a, b) for a, b in zip(compiled_masked(), masked(), strict=True))
        with torch.no_grad():
            for mask in masks:
                mask.scores.mul_(torch.randn_like(mask.scores))
