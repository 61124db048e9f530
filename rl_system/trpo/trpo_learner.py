"""Framework-agnostic part of the TRPO Learner: the GAE learner connector."""

from __future__ import annotations

from ray.rllib.connectors.learner import (
    AddOneTsToEpisodesAndTruncate,
    GeneralAdvantageEstimation,
)
from ray.rllib.core.learner.learner import Learner
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.utils.annotations import override

# What the TRPO update reports per module (learner results, beside RLlib's own keys).
LEARNER_RESULTS_MEAN_KL_KEY = "mean_kl"
LEARNER_RESULTS_SURROGATE_IMPROVEMENT_KEY = "surrogate_improvement"
LEARNER_RESULTS_EXPECTED_IMPROVEMENT_KEY = "expected_improvement"
LEARNER_RESULTS_LINE_SEARCH_ACCEPTED_KEY = "line_search_accepted"
LEARNER_RESULTS_LINE_SEARCH_STEPS_KEY = "line_search_steps"
LEARNER_RESULTS_STEP_FRACTION_KEY = "step_fraction"
LEARNER_RESULTS_POLICY_GRAD_NORM_KEY = "policy_grad_norm"
LEARNER_RESULTS_VF_EXPLAINED_VAR_KEY = "vf_explained_var"


class TRPOLearner(Learner):
    """Adds GAE advantages and value targets to the train batch, as PPOLearner does."""

    @override(Learner)
    def build(self) -> None:
        super().build()

        if (
            self._learner_connector is not None
            and self.config.add_default_connectors_to_learner_pipeline
        ):
            # One artificial timestep per episode (masked out of the losses) carries the
            # bootstrap value at truncation points.
            self._learner_connector.prepend(AddOneTsToEpisodesAndTruncate())
            # GAE with lambda 1 is the Monte-Carlo return minus the value baseline.
            lambda_ = self.config.lambda_ if self.config.use_gae else 1.0
            self._learner_connector.append(
                GeneralAdvantageEstimation(gamma=self.config.gamma, lambda_=lambda_)
            )

    @classmethod
    @override(Learner)
    def rl_module_required_apis(cls) -> list[type]:
        return [ValueFunctionAPI]
