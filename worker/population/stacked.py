"""P same-architecture MLPs as one model: weights stacked on a leading member axis.

Layout: a Linear layer of every member is one tensor ``weight [P, in, out]`` (the transpose
of ``nn.Linear.weight``, so ``x @ weight`` needs no transpose) and ``bias [P, out]``;
BatchNorm scale/shift are ``[P, width]``, its running statistics likewise. Activations are
``[P, batch, width]``, so each layer is one ``torch.baddbmm``; the output layer's logits are
class-major, ``[P, classes, batch]`` (see ``train_step``).

The training step has a hand-written backward pass (the same aten backward kernels autograd
would call) into buffers allocated once per (population size, batch size): autograd would
allocate every activation and gradient afresh each step, and on CPU the page faults of those
multi-megabyte allocations cost about as much as the matmuls (measured: 8,000 minor faults
and 1.6x the step time for P=32 on the 784-128-10 MLP).

Per-member semantics, equal to ``nn.Sequential`` from ``build_mlp`` trained alone:
- BatchNorm normalises each member over its own minibatch (``native_batch_norm`` over a
  ``[batch, P * width]`` view: one channel per member and unit) and keeps per-member running
  statistics (unbiased variance, momentum 0.1) that evaluation uses;
- dropout is inverted dropout with the member's own p (``p = 0`` draws a mask of ones), off
  in evaluation; masks come from one generator shared by the stack, so with dropout a member
  trains like its sequential self in distribution, not sample for sample (the keep
  probability is rounded to a multiple of 1/65536: masks are drawn from 16-bit numbers);
- the loss is each member's mean cross-entropy over its minibatch, and the gradient of
  member j's loss reaches only member j's slices: members never mix.

Input features that are 0 in every training row (``live_features``; after standardisation
every feature constant over the training split, e.g. MNIST's border pixels: 121 of 784 in
the bench's 7,000 training images) add exactly 0 to every training product, and the
weights that read them get exactly 0 from the data (the optimizer still applies weight decay
to them). So the first layer's training matmuls skip them: its weight rows are stored live
features first (``feature_order``) and the training step multiplies only the first
``n_live`` rows and sets the others' gradient to 0. ``export_best`` writes every feature's
weights in the data's order, and evaluation reads every feature, as a validation row may be
nonzero where no training row is; a split that is 0 in the dead features too (as MNIST's
validation split is) is evaluated on the live ones only (``eval_inputs_for``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.training import EVAL_BATCH_SIZE, LEAKY_RELU_SLOPE

_SELU_ALPHA = 1.6732632423543772848170429916717  # torch's SELU constants (aten selu = elu(a, s))
_SELU_SCALE = 1.0507009873554804934193349852946
# Evaluation holds [P, rows, width] fp32 activations. On CPU 16 MiB still feeds big matmuls and
# stays below glibc's largest mmap threshold (32 MiB), so the chunks are reused from the heap
# instead of being mapped afresh and page-faulted in every epoch: 64 MiB chunks made evaluation
# 1.4x slower for P=64 (111 against 78 ms over 1,500 rows of the 784-128-10 MLP). A GPU keeps
# 64 MiB chunks: fewer, bigger launches (not measured here: no GPU).
_EVAL_BYTES_CPU = 16 * 2**20
_EVAL_BYTES_GPU = 64 * 2**20


class StackedMLP:
    """Stacked parameters, buffers and best-epoch snapshots of P members; see module doc.

    ``params`` (trainable, optimizer order) and ``buffers`` (BatchNorm running stats) are
    plain tensors, replaced by ``select`` when members leave; ``grads`` matches ``params``.
    """

    def __init__(
        self,
        models: Sequence[nn.Sequential],
        *,
        activation: str,
        dropouts: Sequence[float],
        device: torch.device,
        dropout_seed: int = 0,
        matmul_dtype: torch.dtype | None = None,
        live: Tensor | None = None,
    ) -> None:
        """``live``: bool [n_features], the features nonzero in some training row
        (``live_features`` of the training inputs); None: every feature. ``train_step`` then
        takes inputs of only those features, as ``inputs_for`` returns them."""
        if not models or len(models) != len(dropouts):
            raise ValueError("StackedMLP: need one dropout rate per model, at least one model")
        linears = [[m for m in model if isinstance(m, nn.Linear)] for model in models]
        norms = [[m for m in model if isinstance(m, nn.BatchNorm1d)] for model in models]
        self.n_hidden = len(linears[0]) - 1
        self.batch_norm = bool(norms[0])
        if any(len(n) != (self.n_hidden if self.batch_norm else 0) for n in norms):
            raise ValueError("StackedMLP: BatchNorm must follow every hidden Linear or none")
        self.activation = activation
        self.matmul_dtype = matmul_dtype
        # The output layer's matmuls stay fp32 unless they read the (bf16) inputs themselves:
        # with 10 classes they are a small share of the FLOPs (~1% for the bench's 784-128-10
        # MLP), and in bf16 converting their operands and results cost more than the bf16
        # matmuls saved (there, P=11 on an AMX Xeon: 101 us of bf16 matmuls and ~70 us of
        # conversions per step against 74 us in fp32).
        self.out_dtype = matmul_dtype if self.n_hidden == 0 else None
        self.device = device
        self.widths = [lin.out_features for lin in linears[0]]
        self.n_features = linears[0][0].in_features
        # The first layer's weight rows: live features first (see the module doc), or None
        # when every feature is live (or none is: then there is nothing to skip either).
        self.feature_order: Tensor | None = None
        self._data_rows: Tensor | None = None  # feature_order's inverse permutation
        self.n_live = self.n_features
        # A net without hidden layers is not stacked this way: its one layer is the output
        # layer, which works class-major (see train_step); every feature is then trained on.
        if live is not None and self.n_hidden:
            if live.shape != (self.n_features,) or live.dtype != torch.bool:
                raise ValueError(
                    f"StackedMLP: live must be bool of shape ({self.n_features},), "
                    f"got {live.dtype} {tuple(live.shape)}"
                )
            n_live = int(live.sum())
            if 0 < n_live < self.n_features:
                order = torch.cat([live.nonzero().view(-1), (~live).nonzero().view(-1)])
                self.feature_order = order.to(device)
                self._data_rows = torch.argsort(self.feature_order)
                self.n_live = n_live
        if self.batch_norm:
            bn = norms[0][0]
            self.bn_momentum = 0.1 if bn.momentum is None else float(bn.momentum)
            self.bn_eps = float(bn.eps)

        def stack(tensors: list[Tensor]) -> Tensor:
            return torch.stack([t.detach() for t in tensors]).to(device).contiguous()

        # params: per hidden layer weight, bias[, bn scale, bn shift]; then the output layer.
        self.params: list[Tensor] = []
        self.buffers: list[Tensor] = []
        self._linear_at: list[tuple[int, int]] = []
        self._norm_at: list[tuple[int, int]] = []
        for layer in range(self.n_hidden + 1):
            self._linear_at.append((len(self.params), len(self.params) + 1))
            weights = [lin[layer].weight for lin in linears]  # [out, in] each
            if device.type == "cpu":
                weight = stack([w.t() for w in weights])  # one strided copy
            else:  # plain copies on the host; the GPU transposes far faster than a host copy
                weight = stack(weights).transpose(1, 2)
            if layer == 0 and self.feature_order is not None:
                weight = weight.index_select(1, self.feature_order)
            self.params.append(weight.contiguous())
            self.params.append(stack([lin[layer].bias for lin in linears]))
            if self.batch_norm and layer < self.n_hidden:
                self._norm_at.append((len(self.params), len(self.params) + 1))
                self.params.append(stack([n[layer].weight for n in norms]))
                self.params.append(stack([n[layer].bias for n in norms]))
                self.buffers.append(stack([n[layer].running_mean for n in norms]))  # type: ignore[misc]
                self.buffers.append(stack([n[layer].running_var for n in norms]))  # type: ignore[misc]
        self.grads = [torch.empty_like(p) for p in self.params]
        self.batches_tracked = int(norms[0][0].num_batches_tracked) if self.batch_norm else 0  # type: ignore[arg-type]

        keep = torch.tensor([1.0 - p for p in dropouts], dtype=torch.float32, device=device)
        self.has_dropout = any(p > 0 for p in dropouts)
        self.scale = (1.0 / keep).view(-1, 1, 1)
        self.keep_threshold = _keep_thresholds(dropouts, device)
        self.random_bits = _RandomBits(dropout_seed, device)

        # Best-epoch snapshots: the initial state until a member's first finished epoch.
        self.best = [t.clone() for t in (*self.params, *self.buffers)]
        self.best_batches_tracked = [self.batches_tracked] * len(models)
        self._workspaces: dict[int, _Workspace] = {}

    @property
    def n_members(self) -> int:
        return int(self.params[0].shape[0])

    # -- membership ------------------------------------------------------------------------

    def select(self, positions: Sequence[int]) -> None:
        """Keep only the members at ``positions`` (current stack positions), in that order."""
        index = torch.tensor(list(positions), dtype=torch.int64, device=self.device)
        self.params = [t.index_select(0, index) for t in self.params]
        self.buffers = [t.index_select(0, index) for t in self.buffers]
        self.best = [t.index_select(0, index) for t in self.best]
        self.best_batches_tracked = [self.best_batches_tracked[i] for i in positions]
        self.keep_threshold = self.keep_threshold.index_select(0, index)
        self.scale = self.scale.index_select(0, index)
        self.grads = [torch.empty_like(p) for p in self.params]
        self._workspaces.clear()

    def save_best(self, positions: Sequence[int]) -> None:
        """Snapshot the current weights and statistics of the members at ``positions``."""
        if not positions:
            return
        index = torch.tensor(list(positions), dtype=torch.int64, device=self.device)
        for current, best in zip((*self.params, *self.buffers), self.best, strict=True):
            best.index_copy_(0, index, current.index_select(0, index))
        for i in positions:
            self.best_batches_tracked[i] = self.batches_tracked

    @torch.no_grad()
    def export_best(self, positions: Sequence[int], models: Sequence[nn.Sequential]) -> None:
        """Give ``models`` (built by ``build_mlp``) the best snapshots of the members at
        ``positions``, in that order, as new tensors on the stack's device.

        One gather per stacked tensor for all of them, then a copy per member and tensor on
        the device: nothing crosses to the host. (Copied into the models' CPU tensors member
        by member, a GPU's 507 members took 0.17 s of small transfers and 0.3 s more to move
        the models back to the GPU; one transfer per tensor still moved 200 MB each way.)
        """
        if len(positions) != len(models):
            raise ValueError(f"export_best: {len(positions)} positions, {len(models)} models")
        if not positions:
            return
        index = torch.tensor(list(positions), dtype=torch.int64, device=self.device)
        best = [t.index_select(0, index) for t in self.best]
        n_params = len(self.params)
        best_params, best_buffers = best[:n_params], best[n_params:]
        for layer, (w, _) in enumerate(self._linear_at):
            weight = best_params[w]
            if layer == 0 and self._data_rows is not None:  # rows back in the data's order
                weight = weight.index_select(1, self._data_rows)
            best_params[w] = weight.transpose(1, 2).contiguous()  # nn.Linear's [out, in]

        def param(t: Tensor) -> nn.Parameter:
            return nn.Parameter(t.clone())  # its own memory, not a view of the whole batch

        for i, (position, model) in enumerate(zip(positions, models, strict=True)):
            linears = [m for m in model if isinstance(m, nn.Linear)]
            norms = [m for m in model if isinstance(m, nn.BatchNorm1d)]
            for lin, (w, b) in zip(linears, self._linear_at, strict=True):
                lin.weight, lin.bias = param(best_params[w][i]), param(best_params[b][i])
            for layer, (bn, (g, s)) in enumerate(zip(norms, self._norm_at, strict=True)):
                bn.weight, bn.bias = param(best_params[g][i]), param(best_params[s][i])
                bn.running_mean = best_buffers[2 * layer][i].clone()
                bn.running_var = best_buffers[2 * layer + 1][i].clone()
                bn.num_batches_tracked.fill_(self.best_batches_tracked[position])  # type: ignore[union-attr]

    # -- training --------------------------------------------------------------------------

    def inputs_for(self, X: Tensor) -> Tensor:
        """``X`` as ``train_step`` gathers it: its live features, in the matmul dtype if any.

        Converting the whole split once is the same rounding the matmul would apply to each
        gathered minibatch, so results are identical; each step then gathers half the bytes and
        skips two conversions of its [P, batch, features] input (forward and weight gradient).
        Likewise the live columns are picked once, not from every minibatch.
        """
        if self.feature_order is not None:
            X = X.index_select(1, self.feature_order[: self.n_live])
        return X if self.matmul_dtype is None else X.to(self.matmul_dtype)

    def draw_dropout_bits(self, b: int) -> None:
        """CUDA: draw the dropout bits of the next ``train_step(..., drawn=True)`` of batch
        size ``b`` (see ``step_graph``); nothing without dropout."""
        if self.has_dropout:
            for bits in self._workspace(b).bits:
                self.random_bits.fill(bits)

    def train_step(
        self, X: Tensor, y: Tensor, rows: Tensor, loss_out: Tensor, *, drawn: bool = False
    ) -> Tensor:
        """Forward + backward of one minibatch per member into ``self.grads``.

        ``X`` is the training split as ``inputs_for`` returns it (its live features, in the
        matmul dtype); ``rows`` [P * b] indexes X/y (member j's minibatch is ``rows[j*b:(j+1)*b]``);
        ``loss_out`` [P] receives each member's mean cross-entropy. Returns the number of
        correct predictions per member [P] (int64, on the device). ``drawn``: the dropout
        bits were drawn by ``draw_dropout_bits`` (CUDA), else the step draws them.
        """
        P = self.n_members
        b = int(rows.numel()) // P
        if X.shape[1] != self.n_live:
            raise ValueError(
                f"train_step: X has {X.shape[1]} features, the stack trains on {self.n_live} "
                "live ones: pass inputs_for(X)"
            )
        ws = self._workspace(b)
        if X.dtype == ws.x.dtype:
            torch.index_select(X, 0, rows, out=ws.x.view(P * b, -1))
        else:  # pass inputs_for(X) to gather in the matmul dtype directly
            ws.x.view(P * b, -1).copy_(X.index_select(0, rows))
        torch.index_select(y, 0, rows, out=ws.y.view(-1))
        params, grads = self.params, self.grads

        h = ws.x
        for layer in range(self.n_hidden):
            w, bias = self._linear_at[layer]
            z = ws.z[layer]
            weight = params[w][:, : self.n_live] if layer == 0 else params[w]
            self._linear(h, weight, params[bias], out=z)
            pre = self._bn_train(layer, z, ws) if self.batch_norm else z
            ws.pre[layer] = pre
            a = ws.a[layer]
            if self.has_dropout:
                # kept = (r <= threshold) for 16-bit uniform r, four per 64-bit draw (see
                # _RandomBits; 8x128x128 masks: 0.10 ms of torch's random bits vs 0.25 ms for
                # uniform_ floats, and bernoulli_ took 0.76 ms).
                mask, kept = ws.mask[layer], ws.kept[layer]
                if drawn:
                    self.random_bits.kept(ws.bits[layer], self.keep_threshold, out=kept)
                else:
                    self.random_bits.keep(ws.bits[layer], self.keep_threshold, out=kept)
                # bool * float would first convert the mask into a fresh float temporary;
                # copying its bytes (0 / 1) and scaling in place is 4x faster (P=43: 59 us
                # against 263 us per layer and step).
                mask.copy_(kept.view(torch.uint8)).mul_(self.scale)
                if self.activation == "relu":
                    # relu(z) * mask == relu(z * mask) as mask >= 0 (the same values, up to
                    # the sign of a zero, which no sum or matmul can tell): two passes
                    # instead of three (P=11: 65 against 109 us per layer and step with the
                    # backward's); relu's backward then reads h, positive exactly where a is
                    # and the mask keeps the unit (elsewhere its gradient is 0 either way).
                    h = torch.mul(pre, mask, out=ws.h[layer]).clamp_min_(0.0)
                else:
                    _act_forward(self.activation, pre, a)
                    h = torch.mul(a, mask, out=ws.h[layer])
            else:
                h = _act_forward(self.activation, pre, a)
        w, bias = self._linear_at[-1]
        # The output layer works class-major: logits [P, C, b] = W^T h^T + bias. Softmax, the
        # loss and the predicted class then reduce over a middle axis of C = 10 and vectorise
        # along the b rows; over a last axis of 10 they cannot (log_softmax: 124 against 7 us
        # for P=11, b=128, C=10 on 2 cores).
        logits, y_row = ws.logits, ws.y.view(P, 1, b)
        self._linear_t(h, params[w], params[bias], out=logits)

        # Cross-entropy, mean over each member's minibatch, and its gradient (softmax - 1_y)/b.
        lsm = ws.dlogits
        torch.ops.aten._log_softmax.out(logits, 1, False, out=lsm)
        torch.sum(lsm.gather(1, y_row), dim=2, out=loss_out.view(P, 1))
        loss_out.div_(-b)
        # max(dim).indices is argmax (the first maximum, NaN counting as one) but vectorised
        # along the rows: 10 against 157 us for argmax over the middle axis.
        correct = logits.max(1, keepdim=True).indices.eq_(y_row).sum(dim=(1, 2))
        dl = lsm.exp_().mul_(1.0 / b).scatter_add_(1, y_row, ws.neg_inv_b)
        dl_rows = dl.transpose(1, 2)  # [P, b, C]

        _bmm(h.transpose(1, 2), dl_rows, out=grads[w], dtype=self.out_dtype)
        torch.sum(dl, dim=2, out=grads[bias])
        if self.n_hidden:
            _bmm(dl_rows, params[w].transpose(1, 2), out=ws.dh[-1], dtype=self.out_dtype)
        for layer in reversed(range(self.n_hidden)):
            dh = ws.dh[layer]
            if self.has_dropout:
                dh.mul_(ws.mask[layer])
            y = ws.h[layer] if self.has_dropout and self.activation == "relu" else ws.a[layer]
            dz = _act_backward(self.activation, dh, ws.pre[layer], y, ws.dz[layer])
            if self.batch_norm:
                dz = self._bn_backward(layer, dz, ws)
            w, bias = self._linear_at[layer]
            h_in = ws.x if layer == 0 else ws.out[layer - 1]
            grad_w = grads[w]
            if layer == 0 and self.feature_order is not None:
                # Every step, as the optimizers may update gradients in place (coupled decay).
                grad_w[:, self.n_live :].zero_()
                grad_w = grad_w[:, : self.n_live]
            _bmm(h_in.transpose(1, 2), dz, out=grad_w, dtype=self.matmul_dtype)
            torch.sum(dz, dim=1, out=grads[bias])
            if layer > 0:
                _bmm(dz, params[w].transpose(1, 2), out=ws.dh[layer - 1], dtype=self.matmul_dtype)
        if self.batch_norm:
            self.batches_tracked += 1
        return correct

    def _bn_train(self, layer: int, z: Tensor, ws: _Workspace) -> Tensor:
        P, b, width = z.shape
        zt = ws.zt[layer]
        zt.view(b, P, width).copy_(z.transpose(0, 1))
        g, s = self._norm_at[layer]
        rm, rv = self.buffers[2 * layer], self.buffers[2 * layer + 1]
        out, mean, invstd = torch.native_batch_norm(
            zt,
            self.params[g].view(-1),
            self.params[s].view(-1),
            rm.view(-1),
            rv.view(-1),
            True,
            self.bn_momentum,
            self.bn_eps,
        )
        ws.bn_saved[layer] = (mean, invstd)
        return out.view(b, P, width).transpose(0, 1)

    def _bn_backward(self, layer: int, dy: Tensor, ws: _Workspace) -> Tensor:
        P, b, width = dy.shape
        dyt = ws.dyt[layer]
        dyt.view(b, P, width).copy_(dy.transpose(0, 1))
        g, s = self._norm_at[layer]
        rm, rv = self.buffers[2 * layer], self.buffers[2 * layer + 1]
        mean, invstd = ws.bn_saved[layer]
        dzt, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            dyt,
            ws.zt[layer],
            self.params[g].view(-1),
            rm.view(-1),
            rv.view(-1),
            mean,
            invstd,
            True,
            self.bn_eps,
            [True, True, True],
        )
        self.grads[g].view(-1).copy_(dgamma)
        self.grads[s].view(-1).copy_(dbeta)
        dz = ws.dz_bn[layer]
        dz.copy_(dzt.view(b, P, width).transpose(0, 1))
        return dz

    # -- evaluation ------------------------------------------------------------------------

    def eval_inputs_for(self, X: Tensor) -> Tensor:
        """``X`` (a split to evaluate) as ``evaluate`` reads it fastest: its live features
        when it is 0 in all the others too (as a validation split mostly is where the
        training split is), else unchanged. Exact either way (see the module doc)."""
        order, k = self.feature_order, self.n_live
        if order is None or bool((X.index_select(1, order[k:]) != 0).any()):
            return X
        return X.index_select(1, order[:k])

    @torch.no_grad()
    def evaluate(self, X: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Summed cross-entropy (float64) and correct count (int64) per member, eval mode.

        ``X``: every feature, or ``eval_inputs_for(X)``.
        """
        P, n = self.n_members, int(y.shape[0])
        budget = _EVAL_BYTES_CPU if self.device.type == "cpu" else _EVAL_BYTES_GPU
        rows = max(1, min(EVAL_BATCH_SIZE, budget // (4 * P * max(self.widths))))
        loss_sum = torch.zeros(P, dtype=torch.float64, device=self.device)
        correct = torch.zeros(P, dtype=torch.int64, device=self.device)
        # Layer 0 for all members as one [rows, F] @ [F, P * width] matmul: X is shared.
        w0, b0 = self._linear_at[0]
        width0 = self.widths[0]
        if X.shape[1] == self.n_live < self.n_features:  # X holds the live features only
            w_first = self.params[w0][:, : self.n_live].transpose(0, 1)  # [n_live, P, width]
        else:
            w_first = self._data_order(self.params[w0].transpose(0, 1))  # [F, P, width]
        w_first = w_first.reshape(int(X.shape[1]), P * width0)
        b_first = self.params[b0].reshape(P * width0)
        for start in range(0, n, rows):
            xc, yc = X[start : start + rows], y[start : start + rows]
            m = int(yc.shape[0])
            if self.matmul_dtype is None:
                z = torch.addmm(b_first, xc, w_first)
            else:
                dt = self.matmul_dtype
                z = torch.add(xc.to(dt) @ w_first.to(dt), b_first)
            h = z.view(m, P, width0).transpose(0, 1)  # [P, m, width]: layer 0's Linear output
            for layer in range(self.n_hidden):  # h: hidden layer ``layer``'s Linear output
                if self.batch_norm:
                    h = self._bn_eval(layer, h)
                h = _act_forward(self.activation, h, torch.empty_like(h)).contiguous()
                w, bias = self._linear_at[layer + 1]
                if layer + 1 < self.n_hidden:
                    out = torch.empty(P, m, self.widths[layer + 1], device=self.device)
                    h = self._linear(h, self.params[w], self.params[bias], out=out)
                else:  # the output layer class-major, as in train_step
                    out = torch.empty(P, self.widths[-1], m, device=self.device)
                    h = self._linear_t(h, self.params[w], self.params[bias], out=out)
            logits = h if self.n_hidden else h.transpose(1, 2)  # [P, C, m]
            losses = F.cross_entropy(logits, yc.expand(P, m), reduction="none")  # [P, m]
            loss_sum += losses.sum(dim=1, dtype=torch.float64)
            correct += (logits.max(dim=1).indices == yc).sum(dim=1)
        return loss_sum, correct

    def _bn_eval(self, layer: int, z: Tensor) -> Tensor:
        P, m, width = z.shape
        g, s = self._norm_at[layer]
        out = F.batch_norm(
            z.transpose(0, 1).reshape(m, P * width),
            self.buffers[2 * layer].view(-1),
            self.buffers[2 * layer + 1].view(-1),
            self.params[g].view(-1),
            self.params[s].view(-1),
            training=False,
            eps=self.bn_eps,
        )
        return out.view(m, P, width).transpose(0, 1)

    # -- helpers ---------------------------------------------------------------------------

    def _data_order(self, rows: Tensor) -> Tensor:
        """First-layer weight rows (dim 0) from the stack's feature order to the data's."""
        return rows if self._data_rows is None else rows.index_select(0, self._data_rows)

    def _linear(self, h: Tensor, weight: Tensor, bias: Tensor, *, out: Tensor) -> Tensor:
        """A hidden layer: ``out`` [P, rows, out] = h @ weight + bias."""
        return _affine(h, weight, bias.unsqueeze(1), out=out, dtype=self.matmul_dtype)

    def _linear_t(self, h: Tensor, weight: Tensor, bias: Tensor, *, out: Tensor) -> Tensor:
        """The output layer, transposed: ``out`` [P, out, rows] = weight^T h^T + bias."""
        a, b = weight.transpose(1, 2), h.transpose(1, 2)
        return _affine(a, b, bias.unsqueeze(2), out=out, dtype=self.out_dtype)

    def _workspace(self, b: int) -> _Workspace:
        ws = self._workspaces.get(b)
        if ws is None:
            ws = _Workspace.allocate(
                self.n_members,
                b,
                self.n_live,
                self.widths,
                self.device,
                batch_norm=self.batch_norm,
                dropout=self.has_dropout,
                input_dtype=self.matmul_dtype or torch.float32,
            )
            self._workspaces[b] = ws
        return ws


@dataclass
class _Workspace:
    """Every per-step activation and gradient buffer for one (P, batch size)."""

    x: Tensor  # [P, b, n_live] gathered inputs (in the matmul dtype: only matmuls read them)
    y: Tensor  # [P, b, 1] gathered labels
    z: list[Tensor]  # per hidden layer [P, b, w]: Linear output
    a: list[Tensor]  # activation output
    mask: list[Tensor]  # scaled dropout mask
    kept: list[Tensor]  # bool: which units the mask keeps
    bits: list[Tensor]  # int64 random bits for the masks (dropout only)
    r16: list[Tensor]  # [P, b, w] int16 view of ``bits``: one uniform 16-bit number per unit
    h: list[Tensor]  # activation * mask (dropout only)
    dh: list[Tensor]  # gradient w.r.t. the hidden layer's output (after dropout)
    dz: list[Tensor]  # gradient w.r.t. the activation's input
    dz_bn: list[Tensor]  # gradient w.r.t. the Linear output (batch norm only)
    zt: list[Tensor]  # [b, P * w] batch-norm layout of z
    dyt: list[Tensor]  # [b, P * w] batch-norm layout of dz
    logits: Tensor  # [P, C, b]: class-major (see train_step)
    dlogits: Tensor  # log-softmax, then the logits' gradient, [P, C, b]
    neg_inv_b: Tensor  # [P, 1, b] filled with -1/b: the "- 1_y" of the CE gradient
    pre: list[Tensor] = field(default_factory=list)  # activation inputs of this step
    bn_saved: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @property
    def out(self) -> list[Tensor]:
        """Each hidden layer's output as the next layer sees it."""
        return self.h if self.h else self.a

    @classmethod
    def allocate(
        cls,
        P: int,
        b: int,
        n_features: int,
        widths: list[int],
        device: torch.device,
        *,
        batch_norm: bool,
        dropout: bool,
        input_dtype: torch.dtype = torch.float32,
    ) -> _Workspace:
        hidden, n_classes = widths[:-1], widths[-1]

        def per_layer(shape_of: Callable[[int], tuple[int, ...]], on: bool = True) -> list[Tensor]:
            return [torch.empty(shape_of(w), device=device) for w in hidden] if on else []

        def pbw(w: int) -> tuple[int, ...]:
            return (P, b, w)

        def bpw(w: int) -> tuple[int, ...]:
            return (b, P * w)

        # four 16-bit numbers per int64 (rounded up)
        bits = [torch.empty(-(-P * b * w // 4), dtype=torch.int64, device=device) for w in hidden]
        bits = bits if dropout else []

        ws = cls(
            x=torch.empty(P, b, n_features, dtype=input_dtype, device=device),
            y=torch.empty(P, b, 1, dtype=torch.int64, device=device),
            z=per_layer(pbw),
            a=per_layer(pbw),
            mask=per_layer(pbw, dropout),
            kept=[torch.empty(P, b, w, dtype=torch.bool, device=device) for w in hidden]
            if dropout
            else [],
            bits=bits,
            r16=[  # no bits without dropout: zip stops at once
                t.view(torch.int16)[: P * b * w].view(P, b, w)
                for t, w in zip(bits, hidden, strict=False)
            ],
            h=per_layer(pbw, dropout),
            dh=per_layer(pbw),
            dz=per_layer(pbw),
            dz_bn=per_layer(pbw, batch_norm),
            zt=per_layer(bpw, batch_norm),
            dyt=per_layer(bpw, batch_norm),
            logits=torch.empty(P, n_classes, b, device=device),
            dlogits=torch.empty(P, n_classes, b, device=device),
            neg_inv_b=torch.full((P, 1, b), -1.0 / b, device=device),
        )
        ws.pre = list(ws.z)
        ws.bn_saved = [(z, z) for z in ws.z]  # placeholders until a forward pass
        return ws


def _affine(
    a: Tensor, b: Tensor, bias: Tensor, *, out: Tensor, dtype: torch.dtype | None
) -> Tensor:
    """``out`` = a @ b + bias (broadcast), the matmul in ``dtype`` (None: fp32)."""
    if dtype is None:
        return torch.baddbmm(bias, a, b, out=out)
    return torch.add(torch.bmm(a.to(dtype), b.to(dtype)), bias, out=out)


def _bmm(a: Tensor, b: Tensor, *, out: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``out`` = a @ b, the matmul in ``dtype`` (None: fp32)."""
    if dtype is None:
        return torch.bmm(a, b, out=out)
    return out.copy_(torch.bmm(a.to(dtype), b.to(dtype)))


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # random_'s [from, to): all 64-bit patterns but one


def live_features(X: Tensor) -> Tensor:
    """Bool [n_features]: the features nonzero in some row of ``X`` (see the module doc)."""
    return (X != 0).any(dim=0)


class _RandomBits:
    """Uniform random 16-bit numbers for the dropout masks of one stack, from one seed.

    CPU: numpy's SFC64 generator. torch's CPU generator (mt19937) is serial and twice as slow:
    the bits of a P=11 stack's 11x128x128 mask took 211 us with ``random_`` against 90 us with
    ``SFC64.random_raw`` (Xeon, 2 cores), about 3% of a bench run's training time. numpy hands
    back a fresh array each draw, used in place through ``torch.from_numpy`` (no copy).
    CUDA: torch's generator on the device fills the workspace's buffer.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.cpu = device.type == "cpu"
        self.sfc64 = np.random.SFC64(seed)
        self.generator = None if self.cpu else torch.Generator(device=device).manual_seed(seed)

    def int16(self, buffer: Tensor, shape: torch.Size) -> Tensor:
        """CPU: ``shape`` uniform int16 numbers, four per 64-bit draw of as many draws as
        ``buffer`` (int64) holds. (On CUDA the bits are drawn into the buffer by ``fill``.)"""
        raw = torch.from_numpy(self.sfc64.random_raw(buffer.numel()).view(np.int64))
        return _int16_view(raw, shape)

    def keep(self, buffer: Tensor, thresholds: Tensor, *, out: Tensor) -> Tensor:
        """``out`` (bool) = r <= ``thresholds`` (int16, broadcast) for fresh uniform int16 r:
        the units each member's dropout keeps this step. On the CPU numpy compares: its int16
        comparison is vectorised, torch's took 47 against 12 us for a P=11 stack's masks."""
        if not self.cpu:
            self.fill(buffer)
            return self.kept(buffer, thresholds, out=out)
        r16 = self.int16(buffer, out.shape)
        np.less_equal(r16.numpy(), thresholds.numpy(), out=out.numpy())
        return out

    def fill(self, buffer: Tensor) -> Tensor:
        """CUDA: draw ``buffer``'s bits now, for ``kept`` to read later (a CUDA graph replays
        the rest of a step, but a draw must advance the generator at every step)."""
        return buffer.random_(_INT64_MIN, _INT64_MAX, generator=self.generator)

    def kept(self, buffer: Tensor, thresholds: Tensor, *, out: Tensor) -> Tensor:
        """``keep`` for bits drawn by ``fill``: the same masks, as the draws come in the
        same order."""
        return torch.le(_int16_view(buffer, out.shape), thresholds, out=out)


def _int16_view(raw: Tensor, shape: torch.Size) -> Tensor:
    """The first ``shape.numel()`` 16-bit numbers of the int64 bits ``raw``, as ``shape``."""
    return raw.view(torch.int16)[: shape.numel()].view(shape)


def _keep_thresholds(dropouts: Sequence[float], device: torch.device) -> Tensor:
    """[P, 1, 1] int16 t with P(r <= t) = 1 - p for r uniform over the int16 range.

    The keep probability is rounded to a multiple of 1/65536 (p = 0 keeps every unit exactly;
    torch's own uniform_ floats have 2^-24 steps); p < 1 always keeps some probability.
    """
    kept_values = [round((1.0 - p) * 65536) for p in dropouts]  # of the 65536 values of r
    thresholds = [-32768 + max(1, k) - 1 for k in kept_values]
    return torch.tensor(thresholds, dtype=torch.int16, device=device).view(-1, 1, 1)


def _act_forward(name: str, x: Tensor, out: Tensor) -> Tensor:
    """``make_activation(name)(x)`` written into ``out``."""
    aten = torch.ops.aten
    if name == "relu":  # aten's relu.out computes into a temporary and copies it over
        return torch.clamp_min(x, 0.0, out=out)
    if name == "leaky_relu":
        return aten.leaky_relu.out(x, LEAKY_RELU_SLOPE, out=out)
    if name == "elu":
        return aten.elu.out(x, 1.0, 1.0, 1.0, out=out)
    if name == "selu":
        return aten.elu.out(x, _SELU_ALPHA, _SELU_SCALE, 1.0, out=out)
    if name == "gelu":
        return aten.gelu.out(x, approximate="none", out=out)
    if name == "tanh":
        return torch.tanh(x, out=out)
    if name == "sigmoid":
        return torch.sigmoid(x, out=out)
    raise ValueError(f"activation: unknown {name!r}")


def _act_backward(name: str, grad: Tensor, x: Tensor, y: Tensor, out: Tensor) -> Tensor:
    """Gradient w.r.t. the activation input ``x`` (output ``y``): autograd's own kernels."""
    aten = torch.ops.aten
    if name == "relu":
        return aten.threshold_backward.grad_input(grad, y, 0.0, grad_input=out)
    if name == "leaky_relu":
        return aten.leaky_relu_backward.grad_input(grad, x, LEAKY_RELU_SLOPE, False, grad_input=out)
    if name == "elu":
        return aten.elu_backward.grad_input(grad, 1.0, 1.0, 1.0, False, x, grad_input=out)
    if name == "selu":
        return aten.elu_backward.grad_input(
            grad, _SELU_ALPHA, _SELU_SCALE, 1.0, False, x, grad_input=out
        )
    if name == "gelu":
        return aten.gelu_backward.grad_input(grad, x, approximate="none", grad_input=out)
    if name == "tanh":
        return aten.tanh_backward.grad_input(grad, y, grad_input=out)
    if name == "sigmoid":
        return aten.sigmoid_backward.grad_input(grad, y, grad_input=out)
    raise ValueError(f"activation: unknown {name!r}")


__all__ = ["StackedMLP"]
