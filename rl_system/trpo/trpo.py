"""Trust Region Policy Optimization (TRPO) on RLlib's new API stack.

Schulman et al. 2015, "Trust Region Policy Optimization" (arXiv 1502.05477), with GAE
advantages (Schulman et al. 2016, arXiv 1506.02438) and a separately regressed value
function, as in the paper authors' code. This file holds the config and the
Algorithm; the update lives in `trpo_learner.py` / `torch/trpo_torch_learner.py` and
the math in `cg.py`.

    from rl_system.trpo import TRPOConfig

    algo = (
        TRPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=2)
        .training(max_kl=0.01, train_batch_size_per_learner=2000)
        .build_algo()
    )
    result = algo.train()  # result["learners"]["default_policy"]["mean_kl"] <= max_kl

The RLModule is RLlib's default PPO actor-critic module, so the PPO baseline and TRPO
train the same network; any RLModule with a value function (`ValueFunctionAPI`) and
an action distribution with `kl()` works.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import (
    ALL_MODULES,
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_MODULE_STEPS_TRAINED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)
from typing_extensions import Self

if TYPE_CHECKING:
    from ray.rllib.core.learner.learner import Learner

# Per-module keys of the learner results (besides RLlib's `policy_loss`, `vf_loss`,
# `entropy`), e.g. result["learners"]["default_policy"]["mean_kl"].


class TRPOConfig(AlgorithmConfig):
    """Configuration of a TRPO Algorithm.

    Defaults follow the paper authors' code: gamma 0.995, GAE lambda 0.97,
    max_kl 0.01, damping 0.1, 10 CG iterations. The policy step size is set by the
    trust region, so `lr` is not used; `vf_lr` is the value function's Adam step.

    .. code-block:: python

        config = TRPOConfig().environment("CartPole-v1").training(max_kl=0.02)
        algo = config.build_algo()
    """

    def __init__(self, algo_class=None):
        super().__init__(algo_class=algo_class or TRPO)

        self.gamma = 0.995
        self.train_batch_size = 4000
        self.rollout_fragment_length = "auto"
        self.num_env_runners = 2

        # GAE (Schulman et al. 2016).
        self.use_gae = True
        self.lambda_ = 0.97
        # Natural-gradient policy step.
        self.max_kl = 0.01
        self.damping = 0.1
        self.cg_iters = 10
        self.line_search_steps = 10
        self.line_search_backtrack = 0.5
        self.line_search_accept_ratio = 0.1
        # Value-function regression (Adam on the value network only).
        self.vf_lr = 1e-3
        self.vf_iters = 5
        self.vf_minibatch_size = 128
        # One episode per update, as the original TeaMs-RL code did (DESIGN §6).
        self.faithful_single_episode_batch = False

    @override(AlgorithmConfig)
    def get_default_rl_module_spec(self) -> RLModuleSpec:
        if self.framework_str != "torch":
            raise ValueError(
                f"TRPO supports only framework='torch' (got {self.framework_str!r}); "
                "call `config.framework('torch')`."
            )
        from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import (
            DefaultPPOTorchRLModule,
        )

        return RLModuleSpec(module_class=DefaultPPOTorchRLModule)

    @override(AlgorithmConfig)
    def get_default_learner_class(self) -> type[Learner] | str:
        if self.framework_str != "torch":
            raise ValueError(
                f"TRPO supports only framework='torch' (got {self.framework_str!r}); "
                "call `config.framework('torch')`."
            )
        from rl_system.trpo.torch.trpo_torch_learner import TRPOTorchLearner

        return TRPOTorchLearner

    @override(AlgorithmConfig)
    def training(
        self,
        *,
        max_kl: float | None = NotProvided,
        damping: float | None = NotProvided,
        cg_iters: int | None = NotProvided,
        line_search_steps: int | None = NotProvided,
        line_search_backtrack: float | None = NotProvided,
        line_search_accept_ratio: float | None = NotProvided,
        vf_lr: float | None = NotProvided,
        vf_iters: int | None = NotProvided,
        vf_minibatch_size: int | None = NotProvided,
        use_gae: bool | None = NotProvided,
        lambda_: float | None = NotProvided,
        faithful_single_episode_batch: bool | None = NotProvided,
        **kwargs,
    ) -> Self:
        """Sets the training related configuration.

        Args:
            max_kl: Trust-region radius delta: the mean KL(old || new) over the
                batch that one policy update may not exceed.
            damping: Added to the Fisher matrix (F + damping * I) so that the
                conjugate-gradient solve is well conditioned.
            cg_iters: Conjugate-gradient iterations for the step direction F^-1 g.
            line_search_steps: Candidate steps the backtracking line search tries.
            line_search_backtrack: Shrink factor between candidates, in (0, 1).
            line_search_accept_ratio: Minimum ratio of actual to predicted surrogate
                improvement for a step to be accepted; 0 only requires improvement.
            vf_lr: Adam learning rate of the value-function regression.
            vf_iters: Epochs of value-function regression per update.
            vf_minibatch_size: Minibatch size of the value regression; None uses the
                whole batch for each of the `vf_iters` steps.
            use_gae: Use GAE(gamma, lambda_) advantages; False uses Monte-Carlo
                returns minus the value baseline (GAE with lambda 1).
            lambda_: GAE lambda.
            faithful_single_episode_batch: Update from exactly one complete episode
                per iteration, as the original TeaMs-RL code did. Off by default: many
                episodes across env runners give a far less noisy gradient.
            **kwargs: Passed on to `AlgorithmConfig.training` (gamma,
                train_batch_size_per_learner, grad_clip for the value step, ...).

        Returns:
            This updated TRPOConfig object.
        """
        super().training(**kwargs)

        if max_kl is not NotProvided:
            self.max_kl = max_kl
        if damping is not NotProvided:
            self.damping = damping
        if cg_iters is not NotProvided:
            self.cg_iters = cg_iters
        if line_search_steps is not NotProvided:
            self.line_search_steps = line_search_steps
        if line_search_backtrack is not NotProvided:
            self.line_search_backtrack = line_search_backtrack
        if line_search_accept_ratio is not NotProvided:
            self.line_search_accept_ratio = line_search_accept_ratio
        if vf_lr is not NotProvided:
            self.vf_lr = vf_lr
        if vf_iters is not NotProvided:
            self.vf_iters = vf_iters
        if vf_minibatch_size is not NotProvided:
            self.vf_minibatch_size = vf_minibatch_size
        if use_gae is not NotProvided:
            self.use_gae = use_gae
        if lambda_ is not NotProvided:
            self.lambda_ = lambda_
        if faithful_single_episode_batch is not NotProvided:
            self.faithful_single_episode_batch = faithful_single_episode_batch

        return self

    @override(AlgorithmConfig)
    def validate(self) -> None:
        super().validate()

        if not (self.enable_rl_module_and_learner and self.enable_env_runner_and_connector_v2):
            self._value_error(
                "TRPO runs only on RLlib's new API stack; call `config.api_stack("
                "enable_rl_module_and_learner=True, "
                "enable_env_runner_and_connector_v2=True)`."
            )
        if not self.faithful_single_episode_batch:
            self.validate_train_batch_size_vs_rollout_fragment_length()

        if not self.max_kl > 0:
            self._value_error(
                f"`max_kl` ({self.max_kl}) must be > 0; the paper uses 0.01: "
                "`config.training(max_kl=0.01)`."
            )
        if not self.damping >= 0:
            self._value_error(
                f"`damping` ({self.damping}) must be >= 0; try `config.training(damping=0.1)`."
            )
        for name in ("cg_iters", "line_search_steps"):
            if getattr(self, name) < 1:
                self._value_error(
                    f"`{name}` ({getattr(self, name)}) must be >= 1; try "
                    f"`config.training({name}=10)`."
                )
        if not 0 < self.line_search_backtrack < 1:
            self._value_error(
                f"`line_search_backtrack` ({self.line_search_backtrack}) must be in "
                "(0, 1); try `config.training(line_search_backtrack=0.5)`."
            )
        if self.line_search_accept_ratio < 0:
            self._value_error(
                f"`line_search_accept_ratio` ({self.line_search_accept_ratio}) must be "
                ">= 0; 0 accepts any improvement, 0.1 is the paper code's value."
            )
        if not self.vf_lr > 0 or self.vf_iters < 0:
            self._value_error(
                f"`vf_lr` ({self.vf_lr}) must be > 0 and `vf_iters` ({self.vf_iters}) "
                ">= 0; try `config.training(vf_lr=1e-3, vf_iters=5)`."
            )
        if self.vf_minibatch_size is not None and self.vf_minibatch_size < 1:
            self._value_error(
                f"`vf_minibatch_size` ({self.vf_minibatch_size}) must be None (whole "
                "batch) or >= 1."
            )
        if not 0 <= self.lambda_ <= 1:
            self._value_error(f"`lambda_` ({self.lambda_}) must be in [0, 1]; the paper uses 0.97.")
        if self.num_learners > 1:
            self._value_error(
                f"TRPO's natural-gradient step runs on one Learner (got num_learners="
                f"{self.num_learners}); call `config.learners(num_learners=0)` or 1."
            )
        if self.torch_compile_learner:
            self._value_error(
                "TRPO's update is not compilable; call "
                "`config.framework(torch_compile_learner=False)`."
            )
        if self.model_config.get("vf_share_layers"):
            self._value_error(
                "TRPO bounds the policy step by max_kl, but a value loss on layers shared "
                "with the policy would move the policy afterwards; call "
                "`config.rl_module(model_config={'vf_share_layers': False})`."
            )

    @property
    @override(AlgorithmConfig)
    def _model_config_auto_includes(self) -> dict[str, Any]:
        return super()._model_config_auto_includes | {"vf_share_layers": False}


class TRPO(Algorithm):
    """TRPO: sample episodes, one trust-region update on the Learner, sync weights."""

    @classmethod
    @override(Algorithm)
    def get_default_config(cls) -> TRPOConfig:
        return TRPOConfig()

    @override(Algorithm)
    def training_step(self) -> None:
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER)):
            episodes, env_runner_results = self._sample_episodes()
            if not episodes:
                return
            self.metrics.aggregate(env_runner_results, key=ENV_RUNNER_RESULTS)

        # One call, one `Learner._update` on the whole batch: the trust region bounds
        # the KL of the full-batch step, so the batch is not split into minibatches here.
        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER)):
            learner_results = self.learner_group.update(
                episodes=episodes,
                timesteps={
                    NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                        (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME)
                    ),
                    NUM_MODULE_STEPS_TRAINED_LIFETIME: self.metrics.peek(
                        (LEARNER_RESULTS, ALL_MODULES, NUM_MODULE_STEPS_TRAINED_LIFETIME),
                        default=0,
                    ),
                },
            )
            self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)

        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER)):
            modules_to_update = set(learner_results[0].keys()) - {ALL_MODULES}
            self.env_runner_group.sync_weights(
                from_worker_or_learner_group=self.learner_group,
                policies=modules_to_update,
                inference_only=True,
            )

    def _sample_episodes(self) -> tuple[list, list]:
        """Episodes for one update and the env runners' metrics."""
        if self.config.faithful_single_episode_batch:
            return self._sample_one_episode()
        step_limit = (
            {"max_agent_steps": self.config.total_train_batch_size}
            if self.config.count_steps_by == "agent_steps"
            else {"max_env_steps": self.config.total_train_batch_size}
        )
        return synchronous_parallel_sample(
            worker_set=self.env_runner_group,
            sample_timeout_s=self.config.sample_timeout_s,
            _uses_new_env_runners=True,
            _return_metrics=True,
            **step_limit,
        )

    def _sample_one_episode(self) -> tuple[list, list]:
        """One complete episode, from the env runners in turn (the faithful mode)."""

        def sample(env_runner):
            return env_runner.sample(num_episodes=1), env_runner.get_metrics()

        group = self.env_runner_group
        if group.num_remote_env_runners() == 0:
            sampled = [sample(group.local_env_runner)]
        else:
            healthy_ids = group.healthy_env_runner_ids()
            if not healthy_ids:
                return [], []
            sampled = group.foreach_env_runner(
                sample,
                local_env_runner=False,
                remote_worker_ids=[healthy_ids[self.iteration % len(healthy_ids)]],
                timeout_seconds=self.config.sample_timeout_s,
            )
        episodes = [episode for eps, _ in sampled for episode in eps]
        return episodes, [metrics for _, metrics in sampled]
