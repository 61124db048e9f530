"""The trust-region math of TRPO as pure torch functions (no Ray import).

Schulman et al. 2015, "Trust Region Policy Optimization" (arXiv 1502.05477). One
policy update solves

    maximize_theta  L(theta) = E[ pi_theta(a|s) / pi_old(a|s) * A(s, a) ]      (eq. 14)
    subject to      KL_mean(old || theta) = E_s[ KL(pi_old(.|s) || pi_theta(.|s)) ] <= max_kl

approximately, as in the paper's Appendix C:

1. policy gradient        g = dL/dtheta at theta_old
2. step direction         step_dir ~= F^-1 g by conjugate gradient, where F is the
                          Hessian of KL_mean at theta_old (the Fisher matrix), used only
                          through Fisher-vector products F v
3. trust-region scaling   shs = 1/2 step_dir^T F step_dir,
                          lagrange_multiplier = sqrt(shs / max_kl),
                          full_step = step_dir / lagrange_multiplier
                          so that the quadratic model of KL_mean at full_step is max_kl
4. line search            try full_step * backtrack_ratio^i, i = 0, 1, ...; keep the first
                          step that improves L and stays inside KL_mean <= max_kl,
                          otherwise keep theta_old.

Shapes: `params` is a sequence of parameter tensors; every "flat" vector has shape
`[n]` with n = total number of elements in `params`.

Run the tests with `python -m pytest tests/unit/rl_system/trpo/test_cg.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

ScalarFn = Callable[[], Tensor]


def flat_grad(
    output: Tensor,
    params: Sequence[Tensor],
    *,
    retain_graph: bool | None = None,
    create_graph: bool = False,
) -> Tensor:
    """d output / d params as one flat vector of shape `[n]`.

    Parameters that `output` does not depend on get zeros.
    """
    grads = torch.autograd.grad(
        output,
        list(params),
        retain_graph=retain_graph,
        create_graph=create_graph,
        allow_unused=True,
    )
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def get_flat_params(params: Sequence[Tensor]) -> Tensor:
    """A detached copy of `params` concatenated into one vector of shape `[n]`."""
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


def set_flat_params(params: Sequence[Tensor], flat: Tensor) -> None:
    """Write the flat vector `flat` (shape `[n]`) back into `params`, in place."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} elements, params have {offset}")


def params_used_by(output: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """The subset of `params` that `output` depends on (in the autograd graph)."""
    grads = torch.autograd.grad(output.sum(), list(params), retain_graph=False, allow_unused=True)
    return [p for p, g in zip(params, grads, strict=True) if g is not None]


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of `values` over the entries where the boolean `mask` (same shape) is set."""
    if mask is None:
        return values.mean()
    return values[mask].mean()


def surrogate_advantage(logp: Tensor, old_logp: Tensor, advantages: Tensor) -> Tensor:
    """Per-sample surrogate r(theta) * A with r = pi_theta(a|s) / pi_old(a|s) (eq. 14).

    All inputs and the output have shape `[B]`; average it to get L(theta).
    """
    return torch.exp(logp - old_logp) * advantages


def conjugate_gradient(
    fvp: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    iters: int = 10,
    residual_tol: float = 1e-10,
) -> Tensor:
    """Approximately solve F x = b for symmetric positive-definite F (Appendix C).

    Args:
        fvp: v -> F v, for vectors of shape `[n]`; F itself is never formed.
        b: right-hand side, shape `[n]` (in TRPO: the policy gradient g).
        iters: maximum number of CG iterations (exact after n in exact arithmetic).
        residual_tol: stop once the squared residual norm r^T r drops below this.

    Returns:
        x with shape `[n]` (in TRPO: the step direction F^-1 g).
    """
    x = torch.zeros_like(b)
    r = b.clone()  # residual b - F x at x = 0
    p = b.clone()  # search direction
    r_dot_r = r @ r
    for _ in range(iters):
        if r_dot_r < residual_tol:
            break
        f_p = fvp(p)
        alpha = r_dot_r / (p @ f_p)
        x += alpha * p
        r -= alpha * f_p
        new_r_dot_r = r @ r
        p = r + (new_r_dot_r / r_dot_r) * p
        r_dot_r = new_r_dot_r
    return x


def fisher_vector_product(
    mean_kl_fn: ScalarFn,
    params: Sequence[Tensor],
    v: Tensor,
    *,
    damping: float,
) -> Tensor:
    """(F + damping * I) v with F the Hessian of the mean KL at the current params.

    Pearlmutter's trick: F v = d/dtheta [ (d KL_mean / d theta) . v ], two backward
    passes, no n x n matrix. At theta = theta_old the KL's gradient is zero and its
    Hessian equals the Fisher information matrix (Appendix C.1).

    Args:
        mean_kl_fn: () -> scalar mean KL(pi_old || pi_theta) over the batch, with pi_old
            detached, differentiable in `params`.
        params: the policy parameters theta.
        v: vector of shape `[n]`.
        damping: Tikhonov damping added to F for a well-conditioned CG solve.

    Returns:
        Vector of shape `[n]`.
    """
    kl_grad = flat_grad(mean_kl_fn(), params, create_graph=True)
    return flat_grad(kl_grad @ v, params) + damping * v


@dataclass(frozen=True)
class LineSearchResult:
    """Outcome of the backtracking line search.

    Attributes:
        accepted: whether a step was kept; when False the params are theta_old.
        num_steps: how many candidate steps were evaluated.
        step_fraction: fraction of the full step that was kept (0.0 when rejected).
        surrogate_improvement: L(theta_new) - L(theta_old) (0.0 when rejected).
        expected_improvement: g . step for the kept step, the linear model's
            prediction of the improvement (for the full step when rejected).
        mean_kl: KL_mean(old || new) at the kept params (0.0 when rejected).
    """

    accepted: bool
    num_steps: int
    step_fraction: float
    surrogate_improvement: float
    expected_improvement: float
    mean_kl: float


def line_search(
    *,
    surrogate_fn: ScalarFn,
    mean_kl_fn: ScalarFn,
    params: Sequence[Tensor],
    full_step: Tensor,
    expected_improvement: float,
    max_kl: float,
    max_backtracks: int = 10,
    backtrack_ratio: float = 0.5,
    accept_ratio: float = 0.1,
) -> LineSearchResult:
    """Backtracking line search on theta_old + backtrack_ratio^i * full_step (Appendix C).

    A candidate is accepted only if all of these hold:
      * the surrogate improves: L(new) - L(old) > 0;
      * it stays in the trust region: KL_mean(old || new) <= max_kl;
      * when `accept_ratio` > 0, the improvement is at least `accept_ratio` times
        the linear prediction `expected_improvement * backtrack_ratio^i`.
    If no candidate passes, the params are restored to theta_old.

    Args:
        surrogate_fn: () -> scalar L(theta) at the current params (to maximize).
        mean_kl_fn: () -> scalar KL_mean(pi_old || pi_theta) at the current params.
        params: the policy parameters theta, currently at theta_old; changed in place.
        full_step: the trust-region step, shape `[n]`.
        expected_improvement: g . full_step.
        max_kl: trust-region radius delta.
        max_backtracks: number of candidates to try.
        backtrack_ratio: shrink factor between candidates, in (0, 1).
        accept_ratio: minimum actual / expected improvement; 0 disables the check.

    Returns:
        A `LineSearchResult`; the params hold the accepted step or theta_old.
    """
    old_params = get_flat_params(params)
    with torch.no_grad():
        surrogate_old = float(surrogate_fn())
    for i in range(max_backtracks):
        step_fraction = backtrack_ratio**i
        set_flat_params(params, old_params + step_fraction * full_step)
        with torch.no_grad():
            improvement = float(surrogate_fn()) - surrogate_old
            kl = float(mean_kl_fn())
        expected = expected_improvement * step_fraction
        ratio_ok = accept_ratio <= 0 or (expected > 0 and improvement / expected >= accept_ratio)
        if math.isfinite(improvement) and improvement > 0 and kl <= max_kl and ratio_ok:
            return LineSearchResult(
                accepted=True,
                num_steps=i + 1,
                step_fraction=step_fraction,
                surrogate_improvement=improvement,
                expected_improvement=expected,
                mean_kl=kl,
            )
    set_flat_params(params, old_params)
    return LineSearchResult(
        accepted=False,
        num_steps=max_backtracks,
        step_fraction=0.0,
        surrogate_improvement=0.0,
        expected_improvement=expected_improvement,
        mean_kl=0.0,
    )


# What `trpo_step` reports when it does not even try a step.
_NO_STEP = LineSearchResult(
    accepted=False,
    num_steps=0,
    step_fraction=0.0,
    surrogate_improvement=0.0,
    expected_improvement=0.0,
    mean_kl=0.0,
)


@dataclass(frozen=True)
class TRPOStepResult:
    """Outcome of one natural-gradient step (`trpo_step`).

    Attributes:
        line_search: the line search's outcome (see `LineSearchResult`).
        policy_grad_norm: ||g||.
        shs: 1/2 step_dir^T F step_dir (0.0 if no step was tried).
        lagrange_multiplier: sqrt(shs / max_kl) (0.0 if no step was tried).
    """

    line_search: LineSearchResult
    policy_grad_norm: float
    shs: float
    lagrange_multiplier: float


def trpo_step(
    *,
    surrogate_fn: ScalarFn,
    mean_kl_fn: ScalarFn,
    params: Sequence[Tensor],
    max_kl: float,
    damping: float = 0.1,
    cg_iters: int = 10,
    line_search_steps: int = 10,
    backtrack_ratio: float = 0.5,
    accept_ratio: float = 0.1,
) -> TRPOStepResult:
    """One TRPO policy update (Appendix C, steps 1-4 in this module's docstring).

    `params` must be at theta_old, where `mean_kl_fn` is zero; they are changed in
    place to the accepted step, or left at theta_old when no step is accepted (a
    zero or non-finite gradient, a non-positive curvature, or a failed line search).
    """
    params = list(params)
    g = flat_grad(surrogate_fn(), params)
    policy_grad_norm = float(g.norm())
    if not math.isfinite(policy_grad_norm) or policy_grad_norm == 0.0:
        return TRPOStepResult(
            line_search=_NO_STEP,
            policy_grad_norm=policy_grad_norm,
            shs=0.0,
            lagrange_multiplier=0.0,
        )

    fvp = partial(fisher_vector_product, mean_kl_fn, params, damping=damping)
    step_dir = conjugate_gradient(fvp, g, iters=cg_iters)
    shs = float(0.5 * (step_dir @ fvp(step_dir)))
    if not math.isfinite(shs) or shs <= 0.0:
        return TRPOStepResult(
            line_search=_NO_STEP,
            policy_grad_norm=policy_grad_norm,
            shs=shs,
            lagrange_multiplier=0.0,
        )

    lagrange_multiplier = math.sqrt(shs / max_kl)
    full_step = step_dir / lagrange_multiplier
    result = line_search(
        surrogate_fn=surrogate_fn,
        mean_kl_fn=mean_kl_fn,
        params=params,
        full_step=full_step,
        expected_improvement=float(g @ full_step),
        max_kl=max_kl,
        max_backtracks=line_search_steps,
        backtrack_ratio=backtrack_ratio,
        accept_ratio=accept_ratio,
    )
    return TRPOStepResult(
        line_search=result,
        policy_grad_norm=policy_grad_norm,
        shs=shs,
        lagrange_multiplier=lagrange_multiplier,
    )
