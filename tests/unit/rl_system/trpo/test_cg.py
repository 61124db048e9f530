"""The trust-region math of `rl_system.trpo.cg` against known answers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from rl_system.trpo.cg import (
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    get_flat_params,
    line_search,
    set_flat_params,
    surrogate_advantage,
    trpo_step,
)

# A one-state categorical "policy" whose parameters are its logits: small enough that
# every quantity has a closed form.
ADVANTAGES = torch.tensor([1.0, -0.5, 0.0, -0.5], dtype=torch.float64)
OLD_LOGITS = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)


def _random_spd(n: int, generator: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, dtype=torch.float64, generator=generator)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 5, 20, 60])
def test_conjugate_gradient_solves_random_spd_systems(n):
    generator = torch.Generator().manual_seed(n)
    a = _random_spd(n, generator)
    b = torch.randn(n, dtype=torch.float64, generator=generator)

    x = conjugate_gradient(lambda v: a @ v, b, iters=n + 5, residual_tol=1e-30)

    assert torch.linalg.norm(a @ x - b) / torch.linalg.norm(b) < 1e-6
    expected = torch.linalg.solve(a, b)
    assert torch.linalg.norm(x - expected) / torch.linalg.norm(expected) < 1e-6


def test_conjugate_gradient_stops_at_the_residual_tolerance():
    calls = []

    def fvp(v):
        calls.append(v)
        return 2.0 * v

    x = conjugate_gradient(fvp, torch.ones(4, dtype=torch.float64), iters=10)

    assert torch.allclose(x, torch.full((4,), 0.5, dtype=torch.float64))
    assert len(calls) == 1  # exact after one step for a multiple of the identity


def test_flat_params_round_trip_and_flat_grad_shapes():
    w = torch.nn.Parameter(torch.randn(2, 3))
    b = torch.nn.Parameter(torch.randn(3))
    flat = get_flat_params([w, b])
    assert flat.shape == (9,)

    set_flat_params([w, b], torch.arange(9.0))
    assert torch.equal(w.detach(), torch.arange(6.0).view(2, 3))
    assert torch.equal(b.detach(), torch.tensor([6.0, 7.0, 8.0]))

    unused = torch.nn.Parameter(torch.ones(2))
    grad = flat_grad((w**2).sum(), [w, unused])
    assert torch.equal(grad, torch.cat([2 * w.detach().reshape(-1), torch.zeros(2)]))


def _policy():
    logits = torch.nn.Parameter(OLD_LOGITS.clone())
    old = Categorical(logits=OLD_LOGITS)

    def mean_kl():
        return kl_divergence(old, Categorical(logits=logits))

    def surrogate():
        # E_{a ~ old}[pi(a) / old(a) * A(a)] computed exactly over the 4 actions.
        actions = torch.arange(4)
        new = Categorical(logits=logits)
        per_action = surrogate_advantage(new.log_prob(actions), old.log_prob(actions), ADVANTAGES)
        return (old.probs * per_action).sum()

    return logits, surrogate, mean_kl


def test_fisher_vector_product_is_the_categorical_fisher_matrix():
    logits, _, mean_kl = _policy()
    p = torch.softmax(OLD_LOGITS, dim=0)
    fisher = torch.diag(p) - torch.outer(p, p)  # Hessian of KL(old || softmax(z)) at z_old
    v = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)

    fv = fisher_vector_product(mean_kl, [logits], v, damping=0.1)

    assert torch.allclose(fv, fisher @ v + 0.1 * v, atol=1e-12)


def _line_search(step_length, *, max_kl=0.01, max_backtracks=10):
    """Line search along the policy gradient g, full step of `step_length` * g / |g|."""
    logits, surrogate, mean_kl = _policy()
    g = flat_grad(surrogate(), [logits])
    full_step = step_length * g / g.norm()
    result = line_search(
        surrogate_fn=surrogate,
        mean_kl_fn=mean_kl,
        params=[logits],
        full_step=full_step,
        expected_improvement=float(g @ full_step),
        max_kl=max_kl,
        max_backtracks=max_backtracks,
    )
    return result, logits


def _value_at(fn, logits, params):
    set_flat_params([logits], params)
    with torch.no_grad():
        return float(fn())


def test_line_search_accepts_a_small_improving_step():
    result, logits = _line_search(0.05)

    assert result.accepted
    assert result.num_steps == 1 and result.step_fraction == 1.0
    assert result.surrogate_improvement > 0
    assert 0 < result.mean_kl <= 0.01
    assert not torch.equal(logits.detach(), OLD_LOGITS)


def test_line_search_backtracks_into_the_trust_region():
    result, _ = _line_search(2.0)

    assert result.accepted
    assert result.num_steps > 1 and result.step_fraction < 1.0
    assert 0 < result.mean_kl <= 0.01


def test_line_search_rejects_a_step_that_breaks_the_kl_bound():
    logits, surrogate, mean_kl = _policy()
    g = flat_grad(surrogate(), [logits])
    stepped = OLD_LOGITS + 3.0 * g / g.norm()
    # The step improves L but leaves the trust region.
    assert _value_at(surrogate, logits, stepped) > _value_at(surrogate, logits, OLD_LOGITS)
    assert _value_at(mean_kl, logits, stepped) > 0.01

    result, logits = _line_search(3.0, max_kl=0.01, max_backtracks=1)

    assert not result.accepted
    assert result.step_fraction == 0.0 and result.mean_kl == 0.0
    assert torch.equal(logits.detach(), OLD_LOGITS)  # old weights restored


def test_line_search_rejects_a_step_that_worsens_the_surrogate():
    result, logits = _line_search(-0.05)

    assert not result.accepted
    assert result.num_steps == 10
    assert torch.equal(logits.detach(), OLD_LOGITS)


def test_line_search_requires_the_expected_improvement_ratio():
    logits, surrogate, mean_kl = _policy()
    g = flat_grad(surrogate(), [logits])
    full_step = 0.05 * g / g.norm()
    # Claim a far larger linear prediction than the step can deliver.
    result = line_search(
        surrogate_fn=surrogate,
        mean_kl_fn=mean_kl,
        params=[logits],
        full_step=full_step,
        expected_improvement=1000.0 * float(g @ full_step),
        max_kl=0.01,
        max_backtracks=3,
        accept_ratio=0.1,
    )

    assert not result.accepted
    assert torch.equal(logits.detach(), OLD_LOGITS)


def test_trpo_step_improves_the_surrogate_inside_the_trust_region():
    logits, surrogate, mean_kl = _policy()
    surrogate_before = _value_at(surrogate, logits, OLD_LOGITS)

    result = trpo_step(surrogate_fn=surrogate, mean_kl_fn=mean_kl, params=[logits], max_kl=0.01)

    new_logits = get_flat_params([logits])
    assert result.line_search.accepted
    assert _value_at(surrogate, logits, new_logits) > surrogate_before
    # The step is scaled to the trust region: the quadratic model puts it at max_kl.
    assert 0.005 < _value_at(mean_kl, logits, new_logits) <= 0.01
    assert result.lagrange_multiplier == pytest.approx((result.shs / 0.01) ** 0.5)


def test_trpo_step_keeps_old_weights_when_the_gradient_is_zero():
    logits = torch.nn.Parameter(OLD_LOGITS.clone())
    old = Categorical(logits=OLD_LOGITS)

    def surrogate():
        return 0.0 * logits.sum()

    def mean_kl():
        return kl_divergence(old, Categorical(logits=logits))

    result = trpo_step(surrogate_fn=surrogate, mean_kl_fn=mean_kl, params=[logits], max_kl=0.01)

    assert not result.line_search.accepted and result.line_search.num_steps == 0
    assert torch.equal(logits.detach(), OLD_LOGITS)


def test_cg_module_imports_without_ray():
    code = "import sys, rl_system.trpo.cg; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
