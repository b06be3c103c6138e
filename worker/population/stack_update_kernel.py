"""The Triton kernel of ``worker.population.fused_update``: one stacked parameter, every member.

Imported only where Triton is (torch's CUDA wheels bring it; its CPU wheels do not). No
``from __future__ import annotations`` here: Triton reads the ``tl.constexpr`` annotations.

One program updates one block of one member's row of a ``[P, k]`` parameter. The member's
optimizer (``kind``) and hyperparameters (a row of the float64 table ``hp``) are scalars
for the whole program, so each program takes one branch. Each branch is the single-tensor
``torch.optim`` algorithm of that optimizer with torch's order of operations, fp32 for
the tensors and float64 for the per-step scalars that torch computes in Python floats
(bias corrections, adagrad's decayed lr), rounded to fp32 where torch passes them to a
kernel. Square roots and divisions are IEEE-rounded (``sqrt_rn``, ``div_rn``), as torch's
kernels compute them, not Triton's fast approximations.

Rounding follows torch's kernels too: it is launched with ``enable_fp_fusion=False``, so
each op rounds on its own as torch's separate kernels do (``buf.mul_(momentum)`` is one
kernel, its result stored in fp32), and an explicit ``tl.fma`` stands where one torch
kernel computes ``a + value * b`` (``add_`` with alpha, ``addcmul_``, ``addcdiv_``,
``lerp_``), which nvcc contracts into one fused multiply-add. RMSprop makes this matter:
dividing by the root of a small square average amplifies a one-ulp difference per step;
with fusion left on, one member's validation loss drifted 1.3e-4 (relative) from its
sequential run in 5 epochs on an H200.
"""

import triton
import triton.language as tl

# A member's ``kind`` is its optimizer's position here, and ``hp``'s columns are these, in
# this order (the kernel reads them by number: a jitted function sees no Python globals).
KINDS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
COLUMNS = ("lr", "weight_decay", "momentum", "dampening", "beta1", "beta2", "eps", "lr_decay")


def update_rows(
    p_ptr,
    g_ptr,
    s1_ptr,
    s2_ptr,
    kind_ptr,
    hp_ptr,
    step_ptr,
    row_len,
    N_HP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    member = tl.program_id(0)
    # The step count, read from the device (float64): a CUDA graph replays the launch as
    # captured, so it cannot be an argument.
    step = tl.load(step_ptr)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < row_len
    at = member.to(tl.int64) * row_len + offsets
    p = tl.load(p_ptr + at, mask=mask)
    g = tl.load(g_ptr + at, mask=mask)
    kind = tl.load(kind_ptr + member)
    hp = hp_ptr + member * N_HP
    lr = tl.load(hp + 0)  # float64, as torch's Python-float lr
    weight_decay = tl.load(hp + 1)

    if kind == 6:  # adamw, decoupled: param.mul_(1 - lr * weight_decay)
        p = p * (1.0 - lr * weight_decay).to(tl.float32)
    else:  # L2 coupled into the gradient: grad = grad.add(param, alpha=weight_decay)
        g = tl.fma(weight_decay.to(tl.float32), p, g)

    if kind < 3:  # sgd, momentum, nesterov: torch.optim.SGD
        if kind > 0:
            momentum = tl.load(hp + 2).to(tl.float32)
            if step == 1:
                buf = g  # torch: buf = clone(grad) on the first step
            else:  # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                keep = (1.0 - tl.load(hp + 3)).to(tl.float32)
                buf = tl.fma(keep, g, tl.load(s1_ptr + at, mask=mask) * momentum)
            tl.store(s1_ptr + at, buf, mask=mask)
            if kind == 2:  # noqa: SIM108 - a ternary on a runtime scalar is no Triton branch
                g = tl.fma(momentum, buf, g)  # grad.add(buf, alpha=momentum)
            else:
                g = buf
        p = tl.fma(-lr.to(tl.float32), g, p)  # param.add_(grad, alpha=-lr)
    elif kind == 3:  # adagrad: torch.optim.Adagrad
        clr = (lr / (1.0 + (step - 1) * tl.load(hp + 7))).to(tl.float32)
        total = tl.fma(g, g, tl.load(s1_ptr + at, mask=mask))  # addcmul_(grad, grad, value=1)
        tl.store(s1_ptr + at, total, mask=mask)
        std = tl.sqrt_rn(total) + tl.load(hp + 6).to(tl.float32)
        p = tl.fma(-clr, tl.div_rn(g, std), p)  # param.addcdiv_(grad, std, value=-clr)
    elif kind == 4:  # rmsprop, not centered: torch.optim.RMSprop
        alpha = tl.load(hp + 5)
        # square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        square_avg = tl.load(s1_ptr + at, mask=mask) * alpha.to(tl.float32)
        square_avg = tl.fma((1.0 - alpha).to(tl.float32) * g, g, square_avg)
        tl.store(s1_ptr + at, square_avg, mask=mask)
        avg = tl.sqrt_rn(square_avg) + tl.load(hp + 6).to(tl.float32)
        momentum = tl.load(hp + 2)
        if momentum > 0:  # buf.mul_(momentum).addcdiv_(grad, avg); param.add_(buf, alpha=-lr)
            buf = tl.load(s2_ptr + at, mask=mask) * momentum.to(tl.float32) + tl.div_rn(g, avg)
            tl.store(s2_ptr + at, buf, mask=mask)
            p = tl.fma(-lr.to(tl.float32), buf, p)
        else:  # param.addcdiv_(grad, avg, value=-lr)
            p = tl.fma(-lr.to(tl.float32), tl.div_rn(g, avg), p)
    else:  # adam, adamw: torch.optim.Adam / AdamW
        beta1 = tl.load(hp + 4)
        beta2 = tl.load(hp + 5)
        exp_avg = tl.load(s1_ptr + at, mask=mask)
        weight = (1.0 - beta1).to(tl.float32)
        if weight < 0.5:  # exp_avg.lerp_(grad, 1 - beta1), torch's two-sided formula
            exp_avg = tl.fma(weight, g - exp_avg, exp_avg)
        else:
            exp_avg = tl.fma(exp_avg - g, 1.0 - weight, g)
        tl.store(s1_ptr + at, exp_avg, mask=mask)
        # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        exp_avg_sq = tl.load(s2_ptr + at, mask=mask) * beta2.to(tl.float32)
        exp_avg_sq = tl.fma((1.0 - beta2).to(tl.float32) * g, g, exp_avg_sq)
        tl.store(s2_ptr + at, exp_avg_sq, mask=mask)
        # beta ** step in float64 (0 ** step is 0: exp(step * -inf))
        bias_correction1 = 1.0 - tl.exp(step * tl.log(beta1))
        bias_correction2 = 1.0 - tl.exp(step * tl.log(beta2))
        step_size = (lr / bias_correction1).to(tl.float32)
        denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), tl.sqrt(bias_correction2).to(tl.float32))
        denom = denom + tl.load(hp + 6).to(tl.float32)
        # param.addcdiv_(exp_avg, denom, value=-step_size)
        p = tl.fma(-step_size, tl.div_rn(exp_avg, denom), p)

    tl.store(p_ptr + at, p, mask=mask)


update_rows_jit = triton.jit(update_rows)
