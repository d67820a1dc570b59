"""Fused (IA)^3 linear: the learned vector folded into the GEMM's epilogue or prologue.

    mode "out":  y = (x W^T + b) * l          l: (out,)    PEFT's output scaling
    mode "in":   y = (x * l) W^T + b          l: (in,)     PEFT's feedforward (input) scaling

Op (registered on import)::

    torch.ops.peftc.ia3_linear(x, weight, bias, vec, mode) -> (y, u)
        x (..., in); weight (out, in); bias (out,) or None; vec: l as above; mode "out" | "in"
        y (..., out); u: the unscaled output x W^T + b for "out" (non-differentiable, kept for
        backward), an empty tensor for "in"

Backward, g = dY (W frozen: no dW unless weight requires grad)::

    out:  dx = (g * l) W          dl = sum_tokens g * u
    in:   v = g W,  dx = v * l    dl = sum_tokens x * v

For "out" the op saves u instead of recomputing x W^T + b in backward: the unfused graph keeps
that same (tokens, out) tensor for its ``mul``, so fusing costs no memory, while recomputing
would add a full GEMM to a backward that is otherwise one GEMM (+50% FLOPs on a frozen layer).
Deriving u = y / l would save even that but breaks where l has zeros.

Devices: CPU (and dtypes Triton does not take) runs fused torch code (addmm, one elementwise
scale). CUDA fp16/bf16/fp32 runs ``gemm.scaled_mm``: one strided GEMM whose prologue scales
the A operand along K and whose epilogue adds the bias, optionally stores the unscaled tile and
scales columns; dl is a column sum (``gemm.colsum``: deterministic, no atomics). x, weight (and
bias) share the base dtype; l may be in another (fp32 on a bf16 base, as HF PEFT keeps it): then the scaling
runs in l's dtype and casts back, exactly PEFT's order, on the torch code (CPU and CUDA).

    >>> y = ia3_linear(x, W, b, l, "out")   # l: (out,)
"""

from __future__ import annotations

import torch

from peftc.kernels.gemm import colsum, scaled_mm, triton_takes

__all__ = ["ia3_linear", "ia3_linear_reference", "triton_forward", "triton_backward", "MODES"]

MODES = ("out", "in")


# ---------------------------------------------------------------- torch reference and CPU path


def ia3_linear_reference(x, weight, bias, vec, mode):
    """Unfused eager semantics (what passes/methods/ia3.py inserts)."""
    if mode == "in":
        return torch.nn.functional.linear(x * vec, weight, bias)
    return torch.nn.functional.linear(x, weight, bias) * vec


def _check(x, weight, bias, vec, mode):
    """Shape/dtype/mode checks shared by the wrapper and the fake impl."""
    if mode not in MODES:
        raise ValueError(f"ia3_linear: mode {mode!r}, want one of {list(MODES)}")
    out, d = weight.shape
    want = d if mode == "in" else out
    if x.shape[-1] != d or tuple(vec.shape) != (want,):
        raise ValueError(f"ia3_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, vec {tuple(vec.shape)}: "
                         f"want (..., in), (out, in), ({'in' if mode == 'in' else 'out'},)")
    if x.dtype != weight.dtype or not vec.is_floating_point():
        raise ValueError(f"ia3_linear: x and weight share the base dtype, vec a float dtype; got {x.dtype}, "
                         f"{weight.dtype}, {vec.dtype}")
    if bias is not None and (tuple(bias.shape) != (out,) or bias.dtype != weight.dtype):
        raise ValueError(f"ia3_linear: bias {tuple(bias.shape)}, want ({out},)")


def _v(t, vec):
    """t in vec's dtype (PEFT scales in the vector's dtype, then casts back)."""
    return t if t.dtype == vec.dtype else t.to(vec.dtype)


def _torch_forward(x, weight, bias, vec, mode):
    x2 = x.reshape(-1, x.shape[-1])
    shape = (*x.shape[:-1], weight.shape[0])
    if mode == "in":
        x2 = (_v(x2, vec) * vec).to(x.dtype)
    u = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
    if mode == "in":
        return u.view(shape), x.new_empty(0)
    return (_v(u, vec) * vec).to(x.dtype).view(shape), u.view(shape)


def _torch_backward(grad, x, weight, vec, u, mode, need_dx):
    g, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    if mode == "out":
        dl = (_v(g, vec) * _v(u.reshape(g.shape), vec)).sum(0)
        dx = torch.mm((_v(g, vec) * vec).to(x.dtype), weight).view(x.shape) if need_dx else x.new_empty(0)
        return dx, dl
    v = torch.mm(g, weight)
    dl = (_v(x2, vec) * _v(v, vec)).sum(0)
    return ((_v(v, vec) * vec).to(x.dtype).view(x.shape) if need_dx else x.new_empty(0)), dl


# ---------------------------------------------------------------- Triton launchers (gemm's kernels)


def triton_forward(x, weight, bias, vec, mode, blocks=None):
    """(y, u) in one launch: "out" stores u and u * vec from the same tile; "in" scales x's tiles."""
    x2 = x.reshape(-1, x.shape[-1])
    shape = (*x.shape[:-1], weight.shape[0])
    if mode == "in":
        y = scaled_mm(x2, weight.t(), out_dtype=x.dtype, bias=bias, pro=vec, blocks=blocks)
        return y.view(shape), x.new_empty(0)
    y, u = scaled_mm(x2, weight.t(), out_dtype=x.dtype, bias=bias, col=vec, store_u=True, blocks=blocks)
    return y.view(shape), u.view(shape)


def triton_backward(grad, x, weight, vec, u, mode, need_dx, blocks=None):
    """(dx, dl): one GEMM launch (skipped for "out" without need_dx) and one column sum."""
    g, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
    if mode == "out":
        dl = colsum(g, u.reshape(g.shape), out_dtype=vec.dtype)
        dx = scaled_mm(g, weight, out_dtype=x.dtype, pro=vec, blocks=blocks).view(x.shape) if need_dx else None
        return (x.new_empty(0) if dx is None else dx), dl
    dx, v = scaled_mm(g, weight, out_dtype=x.dtype, col=vec, store_u=True, blocks=blocks)
    return (dx.view(x.shape) if need_dx else x.new_empty(0)), colsum(x2, v, out_dtype=vec.dtype)


def _use_triton(x, vec=None) -> bool:
    """Triton takes fp16/bf16/fp32 with the vector in x's dtype; mixed dtypes run the torch code."""
    return triton_takes(x) and (vec is None or vec.dtype == x.dtype)


# ---------------------------------------------------------------- custom-op registration


@torch.library.custom_op("peftc::ia3_linear", mutates_args=())
def _ia3_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vec: torch.Tensor,
                   mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _torch_forward(x, weight, bias, vec, mode)


@_ia3_linear_op.register_kernel("cuda")
def _(x, weight, bias, vec, mode):
    return (triton_forward if _use_triton(x, vec) else _torch_forward)(x, weight, bias, vec, mode)


@_ia3_linear_op.register_fake
def _(x, weight, bias, vec, mode):
    _check(x, weight, bias, vec, mode)
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    return y, (x.new_empty(0) if mode == "in" else torch.empty_like(y))


@torch.library.custom_op("peftc::ia3_linear_backward", mutates_args=())
def _ia3_linear_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, vec: torch.Tensor,
                            u: torch.Tensor, mode: str, need_dx: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _torch_backward(grad, x, weight, vec, u, mode, need_dx)


@_ia3_linear_backward_op.register_kernel("cuda")
def _(grad, x, weight, vec, u, mode, need_dx):
    return (triton_backward if _use_triton(x, vec) else _torch_backward)(grad, x, weight, vec, u, mode, need_dx)


@_ia3_linear_backward_op.register_fake
def _(grad, x, weight, vec, u, mode, need_dx):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0)), torch.empty_like(vec)


def _setup_context(ctx, inputs, output):
    x, weight, bias, vec, mode = inputs
    ctx.save_for_backward(x, weight, vec, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.mode = mode


def _backward(ctx, grad, _grad_u):
    x, weight, vec, u = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dl = torch.ops.peftc.ia3_linear_backward(grad, x, weight, vec, u, ctx.mode, need[0])
    g = grad.reshape(-1, grad.shape[-1])
    gl = (g * vec).to(g.dtype) if ctx.mode == "out" else g
    x2 = x.reshape(-1, x.shape[-1])
    xs = (x2 * vec).to(x.dtype) if ctx.mode == "in" else x2
    d_w = torch.mm(gl.t(), xs) if need[1] else None  # trainable base only
    d_bias = gl.sum(0) if need[2] else None
    return dx if need[0] else None, d_w, d_bias, dl if need[3] else None, None


_ia3_linear_op.register_autograd(_backward, setup_context=_setup_context)


def ia3_linear(x, weight, bias, vec, mode: str = "out") -> torch.Tensor:
    """Call the op and return y (see the module docstring)."""
    _check(x, weight, bias, vec, mode)
    return torch.ops.peftc.ia3_linear(x, weight, bias, vec, mode)[0]
