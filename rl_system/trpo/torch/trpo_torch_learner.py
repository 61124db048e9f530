"""Torch TRPO Learner: natural-gradient policy step plus value-function regression."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import tree
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.learner import ENTROPY_KEY, POLICY_LOSS_KEY, VF_LOSS_KEY
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.annotations import override
from ray.rllib.utils.torch_utils import explained_variance
from ray.rllib.utils.typing import ModuleID, TensorType

from rl_system.trpo.cg import (
    masked_mean,
    params_used_by,
    surrogate_advantage,
    trpo_step,
)
from rl_system.trpo.trpo_learner import (
    LEARNER_RESULTS_EXPECTED_IMPROVEMENT_KEY,
    LEARNER_RESULTS_LINE_SEARCH_ACCEPTED_KEY,
    LEARNER_RESULTS_LINE_SEARCH_STEPS_KEY,
    LEARNER_RESULTS_MEAN_KL_KEY,
    LEARNER_RESULTS_POLICY_GRAD_NORM_KEY,
    LEARNER_RESULTS_STEP_FRACTION_KEY,
    LEARNER_RESULTS_SURROGATE_IMPROVEMENT_KEY,
    LEARNER_RESULTS_VF_EXPLAINED_VAR_KEY,
    TRPOLearner,
)

if TYPE_CHECKING:  # the algorithm module imports this learner: annotations only
    from rl_system.trpo.trpo import TRPOConfig

VALUE_OPTIMIZER = "value_function"


class TRPOTorchLearner(TRPOLearner, TorchLearner):
    """One TRPO update per train batch.

    Why `_update` is overridden: RLlib's generic step (`TorchLearner._update`:
    forward_train -> compute_losses -> compute_gradients -> apply_gradients) moves
    parameters with an optimizer along a loss gradient, but TRPO's policy step is a
    constrained solve on the whole batch (CG on Fisher-vector products, then a line
    search that may keep the old weights). `_update` is the Learner's hook for "one
    update from a batch": ours takes the natural-gradient step and then runs the value
    regression through the unchanged parent `_update`, whose loss
    (`compute_loss_for_module`) is the value loss alone and whose Adam optimizer
    therefore only ever sees value-network gradients.
    """

    @override(TorchLearner)
    def configure_optimizers_for_module(
        self, module_id: ModuleID, config: TRPOConfig = None
    ) -> None:
        # All parameters are registered, but only the value loss is ever
        # back-propagated, so Adam moves the value network only (it skips parameters
        # whose grad is None); `_update` checks that no parameter feeds both heads.
        params = self.get_parameters(self._module[module_id])
        self.register_optimizer(
            module_id=module_id,
            optimizer_name=VALUE_OPTIMIZER,
            optimizer=torch.optim.Adam(params),
            params=params,
            lr_or_lr_schedule=config.vf_lr,
        )

    @override(TorchLearner)
    def compute_loss_for_module(
        self,
        *,
        module_id: ModuleID,
        config: TRPOConfig,
        batch: dict[str, Any],
        fwd_out: dict[str, TensorType],
    ) -> TensorType:
        """Value-function regression loss: mean (V(s) - V_target)^2 (GAE targets)."""
        module = self.module[module_id].unwrapped()
        mask = batch.get(Columns.LOSS_MASK)
        values = module.compute_values(batch, embeddings=fwd_out.get(Columns.EMBEDDINGS))
        targets = batch[Postprocessing.VALUE_TARGETS]
        vf_loss = masked_mean((values - targets) ** 2, mask)
        valid = slice(None) if mask is None else mask
        self.metrics.log_dict(
            {
                VF_LOSS_KEY: vf_loss,
                LEARNER_RESULTS_VF_EXPLAINED_VAR_KEY: explained_variance(
                    targets[valid], values[valid]
                ),
            },
            key=module_id,
            window=1,
        )
        return vf_loss

    @override(TorchLearner)
    def _update(self, batch: dict[str, Any], **kwargs) -> tuple[Any, Any, Any]:
        for module_id, module_batch in batch.items():
            self._natural_gradient_step(
                module_id=module_id,
                config=self.config.get_config_for_module(module_id),
                batch=module_batch,
            )

        fwd_out, loss_per_module = {}, {}
        for module_id, module_batch in batch.items():
            config = self.config.get_config_for_module(module_id)
            for minibatch in _minibatches(
                module_batch,
                num_epochs=config.vf_iters,
                minibatch_size=config.vf_minibatch_size,
            ):
                out, losses, _ = super()._update({module_id: minibatch}, **kwargs)
                fwd_out.update(out)
                loss_per_module.update(losses)
        return fwd_out, loss_per_module, {}

    def _natural_gradient_step(
        self, *, module_id: ModuleID, config: TRPOConfig, batch: dict[str, Any]
    ) -> None:
        """The TRPO policy step on `batch`, in place on the module's policy weights."""
        module = self.module[module_id].unwrapped()
        dist_cls = module.get_train_action_dist_cls()
        mask = batch.get(Columns.LOSS_MASK)
        actions = batch[Columns.ACTIONS]
        advantages = batch[Postprocessing.ADVANTAGES]

        def action_dist():
            return dist_cls.from_logits(module.forward_train(batch)[Columns.ACTION_DIST_INPUTS])

        # pi_old: the weights before this update, i.e. the sampling policy.
        with torch.no_grad():
            old_dist = action_dist()
            old_logp = old_dist.logp(actions)

        def surrogate():
            return masked_mean(
                surrogate_advantage(action_dist().logp(actions), old_logp, advantages), mask
            )

        def mean_kl():
            return masked_mean(old_dist.kl(action_dist()), mask)

        result = trpo_step(
            surrogate_fn=surrogate,
            mean_kl_fn=mean_kl,
            params=self._policy_parameters(module, batch),
            max_kl=config.max_kl,
            damping=config.damping,
            cg_iters=config.cg_iters,
            line_search_steps=config.line_search_steps,
            backtrack_ratio=config.line_search_backtrack,
            accept_ratio=config.line_search_accept_ratio,
        )

        with torch.no_grad():
            new_dist = action_dist()
            entropy = masked_mean(new_dist.entropy(), mask)
            policy_loss = -masked_mean(
                surrogate_advantage(new_dist.logp(actions), old_logp, advantages), mask
            )
        search = result.line_search
        self.metrics.log_dict(
            {
                POLICY_LOSS_KEY: policy_loss,
                ENTROPY_KEY: entropy,
                LEARNER_RESULTS_MEAN_KL_KEY: search.mean_kl,
                LEARNER_RESULTS_SURROGATE_IMPROVEMENT_KEY: search.surrogate_improvement,
                LEARNER_RESULTS_EXPECTED_IMPROVEMENT_KEY: search.expected_improvement,
                LEARNER_RESULTS_LINE_SEARCH_ACCEPTED_KEY: float(search.accepted),
                LEARNER_RESULTS_LINE_SEARCH_STEPS_KEY: search.num_steps,
                LEARNER_RESULTS_STEP_FRACTION_KEY: search.step_fraction,
                LEARNER_RESULTS_POLICY_GRAD_NORM_KEY: result.policy_grad_norm,
            },
            key=module_id,
            window=1,
        )

    def _policy_parameters(self, module, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The parameters the action distribution depends on.

        Raises if any of them also feeds the value function: the value regression
        after the trust-region step would then move the policy outside the region.
        """
        params = [p for p in module.parameters() if p.requires_grad]
        policy_params = params_used_by(
            module.forward_train(batch)[Columns.ACTION_DIST_INPUTS], params
        )
        value_params = params_used_by(module.compute_values(batch), params)
        shared = {id(p) for p in policy_params} & {id(p) for p in value_params}
        if shared:
            raise ValueError(
                f"{len(shared)} parameter tensors of {type(module).__name__} feed both "
                "the action distribution and the value function. TRPO needs separate "
                "networks: set `config.rl_module(model_config={'vf_share_layers': "
                "False})` or give your RLModule separate policy and value layers."
            )
        return policy_params


def _minibatches(
    batch: dict[str, Any], *, num_epochs: int, minibatch_size: int | None
) -> Iterator[dict[str, Any]]:
    """`num_epochs` shuffled passes over `batch` in minibatches (whole batch if None)."""
    size = len(tree.flatten(batch[Columns.OBS])[0])
    for _ in range(num_epochs):
        if minibatch_size is None or minibatch_size >= size:
            yield batch
            continue
        permutation = torch.randperm(size)
        for start in range(0, size, minibatch_size):
            index = permutation[start : start + minibatch_size]
            yield tree.map_structure(lambda column, i=index: _take(column, i), dict(batch))


def _take(column: Any, index: torch.Tensor) -> Any:
    if isinstance(column, torch.Tensor):
        return column[index.to(column.device)]
    if isinstance(column, np.ndarray):
        return column[index.numpy()]
    return column
