"""Framework-agnostic part of the TRPO Learner: the GAE learner connector."""

from __future__ import annotations

from ray.rllib.connectors.learner import (
    AddOneTsToEpisodesAndTruncate,
    GeneralAdvantageEstimation,
)
from ray.rllib.core.learner.learner import Learner
from ray.rllib.core.rl_module.apis.value_function_api import ValueFunctionAPI
from ray.rllib.utils.annotations import override


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
