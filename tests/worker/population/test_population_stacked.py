"""The stacked model's hand-written forward/backward against autograd on each member's MLP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from worker.population import StackedMLP
from worker.population.stacked import _act_backward, _act_forward
from worker.training import ACTIVATIONS, TrialConfig, build_mlp, evaluate, make_activation


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_matches_the_module_and_autograd(name: str) -> None:
    x = (torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    expected = make_activation(name)(x)
    grad = torch.randn_like(x)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    with torch.no_grad():
        y = _act_forward(name, x, torch.empty_like(x))
        dx = _act_backward(name, grad, x, y, torch.empty_like(x))
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(dx, expected_grad, rtol=1e-6, atol=1e-7)


def _members(n: int, batch_norm: bool, activation: str) -> list[nn.Sequential]:
    models = []
    for seed, init in zip(range(n), ("he_normal", "xavier_uniform", "orthogonal"), strict=False):
        config = TrialConfig(
            hidden_layers=(12, 8), activation=activation, batch_norm=batch_norm, init=init
        )
        torch.manual_seed(seed)
        model = build_mlp(6, 4, config)
        if batch_norm:  # non-trivial scale/shift and running statistics
            for m in model:
                if isinstance(m, nn.BatchNorm1d):
                    nn.init.uniform_(m.weight, 0.5, 1.5)
                    nn.init.uniform_(m.bias, -0.5, 0.5)
        models.append(model)
    return models


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_train_step_equals_autograd_per_member(activation: str, batch_norm: bool) -> None:
    _check_train_step_equals_autograd(activation, batch_norm, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_step_equals_autograd_per_member_on_cuda() -> None:
    for activation in ACTIVATIONS:
        for batch_norm in (False, True):
            _check_train_step_equals_autograd(activation, batch_norm, torch.device("cuda"))


def _check_train_step_equals_autograd(
    activation: str, batch_norm: bool, device: torch.device
) -> None:
    models = [m.to(device) for m in _members(3, batch_norm, activation)]
    stack = StackedMLP(models, activation=activation, dropouts=[0.0] * 3, device=device)
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(40, 6, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    X, y = X.to(device), y.to(device)
    rows = torch.stack([torch.randperm(40, generator=gen)[:10] for _ in models]).to(device)
    losses = torch.empty(3, device=device)
    correct = stack.train_step(X, y, rows.reshape(-1), losses)

    for j, model in enumerate(models):
        model.train()
        logits = model(X[rows[j]])
        loss = F.cross_entropy(logits, y[rows[j]])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        assert losses[j].item() == pytest.approx(loss.item(), rel=1e-6)
        assert int(correct[j]) == int((logits.argmax(1) == y[rows[j]]).sum())
        # parameters() order equals the stack's params order: Linear, [BatchNorm], ..., Linear
        for stacked_grad, grad in zip(stack.grads, grads, strict=True):
            mine = stacked_grad[j].t() if grad.dim() == 2 else stacked_grad[j]
            torch.testing.assert_close(mine, grad, rtol=1e-5, atol=1e-6)
        # the running statistics were updated exactly like BatchNorm1d's
        norms = [m for m in model if isinstance(m, nn.BatchNorm1d)]
        for i, bn in enumerate(norms):
            torch.testing.assert_close(stack.buffers[2 * i][j], bn.running_mean)
            torch.testing.assert_close(stack.buffers[2 * i + 1][j], bn.running_var)


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_train_step_with_dropout_equals_autograd_with_the_same_masks(
    activation: str, batch_norm: bool
) -> None:
    """With dropout the step must equal each member's autograd step under the masks it drew
    (relu takes its own path there: relu(z * mask) in place of relu(z) * mask)."""
    models = _members(3, batch_norm, activation)
    stack = StackedMLP(
        models, activation=activation, dropouts=[0.0, 0.3, 0.6], device=torch.device("cpu")
    )
    gen = torch.Generator().manual_seed(2)
    X, y = torch.randn(40, 6, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    rows = torch.stack([torch.randperm(40, generator=gen)[:10] for _ in models])
    losses = torch.empty(3)
    stack.train_step(X, y, rows.reshape(-1), losses)
    masks = stack._workspaces[10].mask

    for j, model in enumerate(models):
        model.train()
        h, layer = X[rows[j]], 0
        for module in model:
            h = module(h)
            if isinstance(module, type(make_activation(activation))):
                h = h * masks[layer][j]  # the scaled mask this member drew for the layer
                layer += 1
        loss = F.cross_entropy(h, y[rows[j]])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        assert losses[j].item() == pytest.approx(loss.item(), rel=1e-6)
        for stacked_grad, grad in zip(stack.grads, grads, strict=True):
            mine = stacked_grad[j].t() if grad.dim() == 2 else stacked_grad[j]
            torch.testing.assert_close(mine, grad, rtol=1e-5, atol=1e-6)
    assert bool((masks[0][1] == 0).any()) and bool((masks[0][0] == 1).all())


@pytest.mark.parametrize("batch_norm", [False, True])
def test_evaluate_and_export_match_the_member_models(batch_norm: bool) -> None:
    models = _members(3, batch_norm, "gelu")
    gen = torch.Generator().manual_seed(2)
    X, y = torch.randn(50, 6, generator=gen), torch.randint(0, 4, (50,), generator=gen)
    for model in models:  # move the running statistics away from (0, 1)
        model.train()(X[:25])
    stack = StackedMLP(models, activation="gelu", dropouts=[0.0] * 3, device=torch.device("cpu"))
    loss_sum, correct = stack.evaluate(X, y)
    for j, model in enumerate(models):
        expected = evaluate(model, X, y)
        assert float(loss_sum[j]) / 50 == pytest.approx(expected[0], rel=1e-6)
        assert int(correct[j]) / 50 == expected[1]

    # The best snapshot is the initial state until save_best; export writes it into a model.
    rows = torch.arange(30).repeat(3)
    stack.train_step(X, y, rows, torch.empty(3))
    for param, grad in zip(stack.params, stack.grads, strict=True):
        param.sub_(0.1 * grad)  # one plain SGD step
    stack.save_best([1])
    fresh = _members(3, batch_norm, "gelu")
    stack.export_best([1, 0], [fresh[1], fresh[0]])  # several at once, in any order
    for key, value in models[0].state_dict().items():
        assert torch.equal(fresh[0].state_dict()[key], value), key
    first, trained = models[1][0], fresh[1][0]
    assert isinstance(first, nn.Linear) and isinstance(trained, nn.Linear)
    assert not torch.equal(trained.weight, first.weight)
    torch.testing.assert_close(trained.weight, stack.params[0][1].t())


def test_dropout_masks_are_per_member_and_inverted() -> None:
    models = _members(3, False, "relu")
    stack = StackedMLP(
        models, activation="relu", dropouts=[0.0, 0.5, 0.9], device=torch.device("cpu")
    )
    X, y = torch.randn(64, 6), torch.randint(0, 4, (64,))
    stack.train_step(X, y, torch.arange(64).repeat(3), torch.empty(3))
    mask = stack._workspaces[64].mask[0]
    assert torch.equal(mask[0], torch.ones_like(mask[0]))  # p = 0: nothing dropped
    for j, p in ((1, 0.5), (2, 0.9)):
        kept = mask[j] != 0
        assert torch.allclose(mask[j][kept], torch.tensor(1 / (1 - p)))  # inverted scaling
        assert abs(kept.float().mean().item() - (1 - p)) < 0.05


def test_bf16_inputs_converted_once_train_exactly_like_per_step_conversion() -> None:
    def stack() -> StackedMLP:
        return StackedMLP(
            _members(3, False, "relu"),
            activation="relu",
            dropouts=[0.0] * 3,
            device=torch.device("cpu"),
            matmul_dtype=torch.bfloat16,
        )

    a, b = stack(), stack()
    gen = torch.Generator().manual_seed(3)
    X, y = torch.rand(40, 6, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    rows = torch.stack([torch.randperm(40, generator=gen)[:10] for _ in range(3)]).reshape(-1)
    converted = b.inputs_for(X)
    assert converted.dtype == torch.bfloat16 and a.inputs_for(X).dtype == torch.bfloat16
    loss_a, loss_b = torch.empty(3), torch.empty(3)
    a.train_step(X, y, rows, loss_a)  # fp32 X: each minibatch is converted as it is gathered
    b.train_step(converted, y, rows, loss_b)
    assert torch.equal(loss_a, loss_b)
    for ga, gb in zip(a.grads, b.grads, strict=True):
        assert torch.equal(ga, gb)
    # and an fp32 stack gathers fp32 inputs untouched
    fp32 = StackedMLP(
        _members(1, False, "relu"), activation="relu", dropouts=[0.0], device=torch.device("cpu")
    )
    assert fp32.inputs_for(X) is X


@pytest.mark.parametrize("p", [0.0, 1e-6, 0.1, 0.25, 0.5, 0.9, 0.999])
def test_dropout_thresholds_keep_exactly_the_rounded_probability(p: float) -> None:
    from worker.population.stacked import _keep_thresholds

    threshold = int(_keep_thresholds([p], torch.device("cpu")).item())
    every_r = torch.arange(-32768, 32768, dtype=torch.int32)  # each 16-bit number once
    kept = int((every_r <= threshold).sum())
    assert kept == max(1, round((1 - p) * 65536))
    assert abs(kept / 65536 - (1 - p)) <= 0.5 / 65536 + 1e-12
    if p == 0.0:
        assert kept == 65536  # nothing is ever dropped


def test_dropout_bits_are_uniform_16_bit_numbers_repeated_by_the_seed() -> None:
    from worker.population.stacked import _RandomBits

    shape = torch.Size([4, 256, 256])  # 2^18 numbers
    buffer = torch.empty(shape.numel() // 4, dtype=torch.int64)
    first = _RandomBits(7, torch.device("cpu"))
    draws = [first.int16(buffer, shape).clone() for _ in range(2)]
    assert draws[0].shape == shape and draws[0].dtype == torch.int16
    assert not torch.equal(draws[0], draws[1])  # each step draws new bits
    again = _RandomBits(7, torch.device("cpu"))
    assert torch.equal(again.int16(buffer, shape), draws[0])  # the seed repeats the masks
    assert not torch.equal(_RandomBits(8, torch.device("cpu")).int16(buffer, shape), draws[0])
    values = draws[0].to(torch.int32) + 32768  # 0 .. 65535
    for part in (values >> 12, values & 15):  # the high and the low four bits: 16 bins each
        counts = torch.bincount(part.flatten(), minlength=16).double()
        expected = shape.numel() / 16
        assert ((counts - expected).abs() / expected).max() < 0.02


def test_kept_units_are_the_bits_at_or_below_each_members_threshold() -> None:
    from worker.population.stacked import _keep_thresholds, _RandomBits

    shape = torch.Size([3, 64, 32])
    buffer = torch.empty(shape.numel() // 4, dtype=torch.int64)
    thresholds = _keep_thresholds([0.0, 0.25, 0.9], torch.device("cpu"))
    kept = torch.empty(shape, dtype=torch.bool)
    _RandomBits(5, torch.device("cpu")).keep(buffer, thresholds, out=kept)
    bits = _RandomBits(5, torch.device("cpu")).int16(buffer, shape)  # the same draw again
    assert torch.equal(kept, bits <= thresholds)
    assert bool(kept[0].all())  # p = 0 keeps everything
    assert abs(kept[1].float().mean().item() - 0.75) < 0.03
    assert abs(kept[2].float().mean().item() - 0.1) < 0.03


@pytest.mark.parametrize("hidden", [(12,), ()])
def test_bf16_stack_keeps_the_output_layer_fp32_unless_it_reads_the_inputs(
    hidden: tuple[int, ...],
) -> None:
    """Hidden layers multiply in bf16; the output layer (~1% of the FLOPs) in fp32, except in a
    net without hidden layers, where it is the layer that reads the bf16 inputs."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build_mlp(6, 4, TrialConfig(hidden_layers=hidden)))
    stack = StackedMLP(
        models,
        activation="relu",
        dropouts=[0.0] * 3,
        device=torch.device("cpu"),
        matmul_dtype=torch.bfloat16,
    )
    gen = torch.Generator().manual_seed(4)
    X, y = torch.randn(40, 6, generator=gen), torch.randint(0, 4, (40,), generator=gen)
    rows = torch.stack([torch.randperm(40, generator=gen)[:10] for _ in models]).reshape(-1)
    stack.train_step(stack.inputs_for(X), y, rows, torch.empty(3))
    ws = stack._workspaces[10]
    h = ws.a[0] if hidden else ws.x  # what the output layer reads: fp32 activations or bf16 X
    w, bias = stack._linear_at[-1]
    weight, dl = stack.params[w], ws.dlogits  # dl: the logits' gradient [P, C, b]
    if hidden:  # fp32 throughout: equal to fp32 matmuls of the same operands
        expected_logits = torch.baddbmm(
            bias_of(stack, bias), weight.transpose(1, 2), h.transpose(1, 2)
        )
        expected_grad = torch.bmm(h.transpose(1, 2), dl.transpose(1, 2))
        atol = 1e-6
    else:  # bf16 operands, as the first layer of any bf16 stack
        bf = torch.bfloat16
        product = torch.bmm(weight.transpose(1, 2).to(bf), h.transpose(1, 2).to(bf))
        expected_logits = product + bias_of(stack, bias)
        expected_grad = torch.bmm(h.transpose(1, 2).to(bf), dl.transpose(1, 2).to(bf)).float()
        atol = 0.0
        # and really bf16: the fp32 product of the same operands differs
        fp32 = torch.bmm(h.transpose(1, 2).float(), dl.transpose(1, 2))
        assert not torch.allclose(stack.grads[w], fp32, rtol=0, atol=1e-6)
    torch.testing.assert_close(ws.logits, expected_logits, rtol=0, atol=atol)
    torch.testing.assert_close(stack.grads[w], expected_grad, rtol=0, atol=atol)


def bias_of(stack: StackedMLP, index: int) -> torch.Tensor:
    return stack.params[index].unsqueeze(2)  # [P, C, 1]: broadcast over the batch


# -- input features that no training row uses ----------------------------------------------

_DEAD = [0, 3, 4]  # of 6 features: zero in every training row below


def _with_dead_features(gen: torch.Generator, n: int = 40) -> torch.Tensor:
    X = torch.randn(n, 6, generator=gen)
    X[:, _DEAD] = 0.0
    return X


@pytest.mark.parametrize("batch_norm", [False, True])
def test_dead_features_are_skipped_and_the_step_still_equals_autograd(batch_norm: bool) -> None:
    """The first layer multiplies only the live features' rows; its gradient equals autograd's
    on the full inputs, rows of dead features exactly 0 even where the buffer held something
    else (optimizers add coupled weight decay into the gradients in place)."""
    from worker.population.stacked import live_features

    models = _members(3, batch_norm, "relu")
    gen = torch.Generator().manual_seed(5)
    X, y = _with_dead_features(gen), torch.randint(0, 4, (40,), generator=gen)
    live = live_features(X)
    assert live.tolist() == [i not in _DEAD for i in range(6)]
    stack = StackedMLP(
        models, activation="relu", dropouts=[0.0] * 3, device=torch.device("cpu"), live=live
    )
    assert stack.n_live == 3 and stack.feature_order is not None
    assert stack.feature_order.tolist() == [1, 2, 5, 0, 3, 4]  # live first, then dead
    inputs = stack.inputs_for(X)
    assert torch.equal(inputs, X[:, [1, 2, 5]])
    assert stack._workspace(10).x.shape == (3, 10, 3)  # gathers live features only
    with pytest.raises(ValueError, match="pass inputs_for"):
        stack.train_step(X, y, torch.arange(30), torch.empty(3))

    rows = torch.stack([torch.randperm(40, generator=gen)[:10] for _ in models])
    for g in stack.grads:
        g.fill_(float("nan"))  # what an optimizer may leave there
    losses = torch.empty(3)
    stack.train_step(inputs, y, rows.reshape(-1), losses)
    first = stack.grads[0]
    assert torch.equal(first[:, 3:], torch.zeros_like(first[:, 3:]))
    for j, model in enumerate(models):
        model.train()
        loss = F.cross_entropy(model(X[rows[j]]), y[rows[j]])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        assert losses[j].item() == pytest.approx(loss.item(), rel=1e-6)
        torch.testing.assert_close(stack._data_order(first[j]).t(), grads[0], rtol=1e-5, atol=1e-6)
        for stacked_grad, grad in zip(stack.grads[1:], grads[1:], strict=True):
            mine = stacked_grad[j].t() if grad.dim() == 2 else stacked_grad[j]
            torch.testing.assert_close(mine, grad, rtol=1e-5, atol=1e-6)


def test_dead_features_still_count_in_evaluation_and_export() -> None:
    """A validation row may be nonzero where no training row is: evaluation multiplies every
    feature, in the data's order, and the exported model has the data's layout."""
    from worker.population.stacked import live_features

    models = _members(3, False, "gelu")
    gen = torch.Generator().manual_seed(6)
    X_train = _with_dead_features(gen)
    X_val, y_val = torch.randn(30, 6, generator=gen), torch.randint(0, 4, (30,), generator=gen)
    stack = StackedMLP(
        models,
        activation="gelu",
        dropouts=[0.0] * 3,
        device=torch.device("cpu"),
        live=live_features(X_train),
    )
    assert stack.eval_inputs_for(X_val) is X_val  # nonzero in dead features: all of it
    quiet = X_val.clone()
    quiet[:, _DEAD] = 0.0  # as the training rows: evaluate may read the live features only
    assert torch.equal(stack.eval_inputs_for(quiet), quiet[:, [1, 2, 5]])
    for inputs, raw in ((X_val, X_val), (stack.eval_inputs_for(quiet), quiet), (quiet, quiet)):
        loss_sum, correct = stack.evaluate(inputs, y_val)
        for j, model in enumerate(models):
            expected = evaluate(model, raw, y_val)
            assert float(loss_sum[j]) / 30 == pytest.approx(expected[0], rel=1e-6)
            assert int(correct[j]) / 30 == expected[1]
    fresh = _members(3, False, "gelu")
    for model in fresh:
        for p in model.parameters():
            p.data.zero_()
    stack.export_best([2], [fresh[2]])
    for key, value in models[2].state_dict().items():
        assert torch.equal(fresh[2].state_dict()[key], value), key


def test_all_or_no_live_features_change_nothing() -> None:
    for live in (torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)):
        stack = StackedMLP(
            _members(1, False, "relu"),
            activation="relu",
            dropouts=[0.0],
            device=torch.device("cpu"),
            live=live,
        )
        assert stack.feature_order is None and stack.n_live == 6
        X = torch.randn(5, 6)
        assert stack.inputs_for(X) is X
    with pytest.raises(ValueError, match="live must be bool of shape"):
        StackedMLP(
            _members(1, False, "relu"),
            activation="relu",
            dropouts=[0.0],
            device=torch.device("cpu"),
            live=torch.ones(5, dtype=torch.bool),
        )


def test_evaluate_records_no_autograd_graph() -> None:
    stack = StackedMLP(
        _members(2, False, "relu"),
        activation="relu",
        dropouts=[0.0] * 2,
        device=torch.device("cpu"),
    )
    for p in stack.params:
        p.requires_grad_(True)  # even then, evaluation builds no graph
    loss_sum, _ = stack.evaluate(torch.randn(8, 6), torch.randint(0, 4, (8,)))
    assert not loss_sum.requires_grad
