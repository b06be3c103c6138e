"""Replayed training steps (CUDA graphs) train exactly as eager steps do."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from worker.population import StackedMLP, train_population, trainer
from worker.population.fused_update import FusedStackOptimizer
from worker.population.step_graph import StepGraph
from worker.training import TensorSplits, TrialConfig, build_mlp

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")


def _stack(configs: list[TrialConfig], device: torch.device) -> StackedMLP:
    models = []
    for c in configs:
        torch.manual_seed(c.seed)
        models.append(build_mlp(20, 5, c))
    return StackedMLP(
        models,
        activation=configs[0].activation,
        dropouts=[c.dropout for c in configs],
        device=device,
        dropout_seed=7,
    )


def test_cpu_stacks_are_refused() -> None:
    configs = [TrialConfig(hidden_layers=(8,))]
    stack = _stack(configs, torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA stacks only"):
        StepGraph(stack, None, torch.zeros(4, 20), torch.zeros(4), 2)  # type: ignore[arg-type]


@needs_cuda
@pytest.mark.parametrize("batch_norm", [False, True])
def test_replayed_steps_equal_eager_steps_through_a_membership_change(batch_norm: bool) -> None:
    """Two copies of a stack (dropout on, every optimizer): one steps eagerly, the other
    through StepGraph; members leave halfway (the graph is recorded again). Weights, losses,
    counts, dropout masks and batch-norm statistics stay identical."""
    device = torch.device("cuda")
    configs = [
        TrialConfig(
            hidden_layers=(16, 8),
            batch_norm=batch_norm,
            optimizer=OPTIMIZERS[i % 7],
            learning_rate=0.01,
            weight_decay=1e-4,
            dropout=0.3,
            seed=i,
        )
        for i in range(9)
    ]
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(64, 20, generator=gen).to(device), torch.randint(0, 5, (64,)).to(device)
    eager, graphed = _stack(configs, device), _stack(configs, device)
    eager_opt = FusedStackOptimizer(configs, eager.params)
    graphed_opt = FusedStackOptimizer(configs, graphed.params)
    graph = StepGraph(graphed, graphed_opt, X, y, batch_size=16)
    eager_correct = torch.zeros(9, dtype=torch.int64, device=device)
    for step in range(12):
        if step == 6:  # three members leave; the others continue in a new order
            kept = [8, 0, 2, 3, 5, 6]
            for stack, opt in ((eager, eager_opt), (graphed, graphed_opt)):
                stack.select(kept)
                opt.select(torch.tensor(kept))
            eager_correct = eager_correct.index_select(0, torch.tensor(kept, device=device))
            graph.correct = graph.correct.index_select(0, torch.tensor(kept, device=device))
            kept_correct = graph.correct.clone()
            graph.reset()
        P = eager.n_members
        rows = torch.randint(0, 64, (P, 16), generator=gen).to(device)
        eager_loss, graph_loss = torch.empty(P, device=device), torch.empty(P, device=device)
        eager_correct += eager.train_step(X, y, rows.view(-1), eager_loss)
        eager_opt.step(eager.params, eager.grads)
        graph.step(rows, graph_loss)
        assert torch.equal(eager_loss, graph_loss), step
    assert graph.replays == 10  # two steps recorded (one per membership), ten replayed
    assert torch.equal(eager_correct, graph.correct + kept_correct)
    for a, b in zip(
        (*eager.params, *eager.buffers), (*graphed.params, *graphed.buffers), strict=True
    ):
        assert torch.equal(a, b)
    assert eager.batches_tracked == graphed.batches_tracked


@needs_cuda
def test_a_population_trains_the_same_with_and_without_step_graphs(
    small_digits: TensorSplits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train_population on a GPU, step graphs on and off: the same histories (dropout,
    early stopping thinning the stack, an epoch's last smaller minibatch stepped eagerly)."""
    base = TrialConfig(hidden_layers=(32,), batch_size=48, max_epochs=4, dropout=0.2)
    configs = [
        replace(base, optimizer=OPTIMIZERS[i % 7], learning_rate=3e-3, seed=i, patience=1)
        for i in range(10)
    ]
    on_gpu = small_digits.to("cuda")
    with_graphs = train_population(configs, on_gpu)
    monkeypatch.setattr(trainer, "STEP_GRAPHS", False)
    without = train_population(configs, on_gpu)
    assert any(r.stopped_early for r in without)  # the stack thinned out on the way
    for a, b in zip(with_graphs, without, strict=True):
        assert [h["epoch"] for h in a.history] == [h["epoch"] for h in b.history]
        for mine, theirs in zip(a.history, b.history, strict=True):
            for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), key
        for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
