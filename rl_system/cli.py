"""``teams-rl``: the command line of every stage.

    teams-rl models prepare                      # one-time conversion of embedded models
    teams-rl serve --config configs/demo.yaml    # role applications on Ray Serve
    teams-rl serve --config configs/demo.yaml --emit-config serve_config.yaml
    teams-rl train-policy --config configs/demo.yaml   # stage 1: RLlib TRPO
    teams-rl build-dataset --config configs/demo.yaml  # stage 2: Ray Data
    teams-rl sft --config configs/demo.yaml            # stage 3: Ray Train FSDP
    teams-rl evaluate --config configs/demo.yaml       # stage 4: lm-eval, MIA, report
    teams-rl pipeline --config configs/demo.yaml       # all of them, skipping what is done
    teams-rl evaluate --config configs/demo.yaml --compare runs/wizardlm  # stage 4
    teams-rl reviewer-check --config configs/demo.yaml  # judge modes on labelled pairs
    teams-rl export --config configs/demo.yaml --to-hub user/name  # dataset to the Hub

Every command takes ``--config FILE`` and any number of ``--set key=value`` overrides;
an invalid config stops the command before Ray starts, naming the field.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import click

from rl_system.config import TeamsRLConfig, load_config
from serve.errors import TeamsRLError

logger = logging.getLogger("teams_rl")


def _config_options(fn):
    fn = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config key, e.g. --set serve.max_batch_size=4 (repeatable).",
    )(fn)
    fn = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="Run config YAML (default: built-in defaults).",
    )(fn)
    return fn


_address_option = click.option(
    "--address", default=None, help="Ray cluster address, e.g. auto (default: start locally)."
)


class _Commands(click.Group):
    """Every user-fixable error (``TeamsRLError``) ends a command with its message and exit
    status 1; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TeamsRLError as exc:
            raise click.ClickException(str(exc)) from None


class ClusterUnreachable(TeamsRLError):
    """``--address`` (or ``RAY_ADDRESS``) names a Ray cluster we cannot join."""


_RAY_LOGS_KEY = "teams_rl.ray_session_logs"  # click context meta: set when we started Ray


@contextmanager
def _run_dir_held(cfg: TeamsRLConfig, command: str):
    """One run per run directory, taken before Ray starts: an unwritable directory or a
    second run on it fails at once (the message names the holder's pid).

    Yields the ``log`` the stages print with; the run's logs land in ``runs/<name>/logs/``
    (``rl_system.runlog``), Ray's session logs copied there at the end, failed or not."""
    from rl_system.rundir import run_lock
    from rl_system.runlog import copy_ray_logs, run_logs

    with run_lock(cfg.run_dir, what=f"teams-rl {command}"), run_logs(cfg.run_dir) as log:
        try:
            yield log
        finally:
            ctx = click.get_current_context(silent=True)
            session_logs = ctx and ctx.meta.get(_RAY_LOGS_KEY)
            if session_logs:
                copy_ray_logs(cfg.run_dir, Path(session_logs))


def _load(config_path: str | None, overrides: tuple[str, ...]) -> TeamsRLConfig:
    return load_config(config_path, list(overrides))


# A local Ray started by the CLI advertises at least this many logical CPUs: our actors
# (env runners, Serve replicas, Ray Data stages) mostly wait on model calls, and with
# only the physical count a 2-core laptop could not place two env runners beside a replica.
LOCAL_MIN_LOGICAL_CPUS = 8


def _check_reachable(address: str, timeout_s: float = 5.0) -> bool:
    """Ray retries an unreachable GCS for minutes; a plain TCP probe fails in seconds.

    Returns whether ``address`` was probed (a host:port); raises when it does not answer.
    """
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return False  # "auto", ray:// client addresses: Ray resolves and reports these itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterUnreachable(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); check --address "
            "(the head node's GCS port, usually 6379) and that the cluster is up"
        ) from None
    return True


def _init_ray(address: str | None) -> None:
    """Connect to ``--address`` (or the job's ``RAY_ADDRESS``), else start a local Ray."""
    import os

    import ray
    from ray.exceptions import AuthenticationError

    from rl_system.runlog import quiet_console

    # Under `ray job submit` the driver gets RAY_ADDRESS; it must join that cluster, and
    # Ray refuses resource arguments when joining one.
    address = address or os.environ.get("RAY_ADDRESS") or None  # "" means: start locally
    probed = bool(address) and _check_reachable(address)
    num_cpus = None if address else max(os.cpu_count() or 1, LOCAL_MIN_LOGICAL_CPUS)
    verbose = _verbose()
    quiet_console(verbose=verbose)  # ray.init's own INFO lines too
    try:
        # Workers' output (model loads, RLlib, Serve replicas) stays in the session logs
        # (copied to the run directory) unless -v.
        ray.init(address=address, num_cpus=num_cpus, log_to_driver=verbose)
    except AuthenticationError as exc:
        raise ClusterUnreachable(f"the Ray cluster at {address} refused us: {exc}") from None
    except ConnectionError as exc:
        # When the port answered, a refusal is most often a missing or wrong token: Ray
        # 2.60 clusters use token authentication by default.
        hint = f". The port answers, so check the token: {_TOKEN_HINT}" if probed else ""
        raise ClusterUnreachable(
            f"cannot join the Ray cluster at {address}: {exc}{hint}"
        ) from None
    _quiet_ray_data(verbose)
    quiet_console(verbose=verbose)  # again: in case init reconfigured Ray's logging
    ctx = click.get_current_context(silent=True)
    if ctx is not None and not address:
        ctx.meta[_RAY_LOGS_KEY] = ray._private.worker._global_node.get_logs_dir_path()


def _quiet_ray_data(verbose: bool) -> None:
    """Ray Data's own progress bars redraw per operator and drown a stage's progress line;
    ``-v`` keeps them. Set on the driver: its DataContext travels with every dataset."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = verbose


def _verbose() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("verbose"))


def _roles_up(cfg: TeamsRLConfig) -> None:
    """Deploy the roles unless they run; a GPU count no node has fails first."""
    from rl_system.placement import check_gpu_demands
    from serve.app import ensure_deployed

    check_gpu_demands(cfg, stages=["serve"])
    ensure_deployed(cfg)


_TOKEN_HINT = (
    "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the cluster's token (or put it in "
    "~/.ray/auth_token); `ray get-auth-token` on the head node prints it"
)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True,
              help="Debug logging, and Ray's own logs and progress bars on the console.")
def main(verbose: bool) -> None:
    """TeaMs-RL on Ray: RL-guided instruction data, one SFT, no RLHF."""
    from rl_system.runlog import quiet_model_loading

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_model_loading(verbose=verbose)  # before anything imports transformers or Ray


@main.group()
def models() -> None:
    """Model references and the embedded models."""


@models.command("prepare")
def models_prepare() -> None:
    """Convert the embedded GGUF model once to a cached safetensors directory."""
    from serve.models import prepare_all

    for name, path in prepare_all(log=click.echo).items():
        click.echo(f"embedded:{name} -> {path}")


@main.command("serve")
@_config_options
@_address_option
@click.option(
    "--emit-config",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a Serve config YAML (for `serve run` / `serve deploy`) and exit.",
)
def serve_command(
    config_path: str | None,
    overrides: tuple[str, ...],
    address: str | None,
    emit_config: str | None,
) -> None:
    """Deploy the instructor, reviewer and expert roles and serve until interrupted."""
    import yaml

    cfg = _load(config_path, overrides)
    if emit_config:
        from serve.app import serve_config

        Path(emit_config).write_text(yaml.safe_dump(serve_config(cfg), sort_keys=False))
        click.echo(f"wrote {emit_config}; deploy it with: serve deploy {emit_config}")
        return

    import ray
    from ray import serve

    from rl_system.placement import check_gpu_demands
    from serve.app import check_key, deploy

    keyed = check_key(cfg)  # refuse an open public host before Ray starts
    _init_ray(address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        check_gpu_demands(cfg, stages=["serve"])  # a GPU count no node has
        url = deploy(cfg)
        auth = "on (Authorization: Bearer <key>)" if keyed else "off (loopback only)"
        click.echo(f"serving roles at {url}  (auth {auth}); Ctrl-C to stop")
        stop.wait()
    finally:
        click.echo("shutting down Serve ...")
        serve.shutdown()
        ray.shutdown()


@main.command("train-policy")
@_config_options
@_address_option
def train_policy_command(
    config_path: str | None, overrides: tuple[str, ...], address: str | None
) -> None:
    """Stage 1: train the evolution policy (TRPO, or PPO with policy.algorithm=ppo)."""
    from rl_system.policy import load_seed_instructions, train_policy

    cfg = _load(config_path, overrides)
    load_seed_instructions(cfg)  # bad or empty seeds fail here, before Ray starts
    with _run_dir_held(cfg, "train-policy") as log:
        _init_ray(address)
        _roles_up(cfg)
        summaries = train_policy(cfg, log=log)
    click.echo(f"policy: {len(summaries)} iterations run; outputs in {cfg.stage_dir('policy')}")


@main.command("build-dataset")
@_config_options
@_address_option
def build_dataset_command(
    config_path: str | None, overrides: tuple[str, ...], address: str | None
) -> None:
    """Stage 2: evolve seeds with dataset.strategy, answer, filter, write parquet + exports."""
    from rl_system.dataset import build_dataset, check_inputs

    cfg = _load(config_path, overrides)
    check_inputs(cfg)  # bad seeds or checkpoint fail here, before Ray starts
    with _run_dir_held(cfg, "build-dataset") as log:
        _init_ray(address)
        _roles_up(cfg)
        manifest = build_dataset(cfg, log=log)
    pairs = manifest["summary"]["pairs_written"]
    click.echo(f"dataset: {pairs} pairs in {cfg.stage_dir('dataset')}")


@main.command("export")
@_config_options
@click.option("--to-hub", "repo_id", default=None, metavar="REPO_ID",
              help="Hugging Face dataset repo, e.g. user/teams-rl-demo (token from HF_TOKEN).")
@click.option("--to-dir", "to_dir", type=click.Path(file_okay=False), default=None,
              help="Write the same files (data/*.parquet + README.md) to a local folder.")
@click.option("--private", is_flag=True, help="Create the Hub repo as private.")
def export_command(config_path: str | None, overrides: tuple[str, ...], repo_id: str | None,
                   to_dir: str | None, private: bool) -> None:
    """Publish this run's complete dataset (parquet + card) to the Hub or a local folder."""
    from rl_system.dataset.export import export_to_dir, export_to_hub

    if (repo_id is None) == (to_dir is None):
        raise click.UsageError("give exactly one of --to-hub REPO_ID and --to-dir PATH")
    cfg = _load(config_path, overrides)
    if to_dir is not None:
        click.echo(f"export: wrote {export_to_dir(cfg.stage_dir('dataset'), to_dir)}")
    else:
        url = export_to_hub(cfg.stage_dir("dataset"), repo_id, private=private, log=click.echo)
        click.echo(f"export: {url}")


@main.command("evaluate")
@_config_options
@click.option(
    "--compare",
    "compare",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Another run directory to put beside this run (repeatable; adds to eval.compare).",
)
@click.option("--force", is_flag=True, help="Re-run lm-eval and MIA even if outputs exist.")
def evaluate_command(
    config_path: str | None, overrides: tuple[str, ...], compare: tuple[str, ...], force: bool
) -> None:
    """Stage 4: lm-eval (own process), membership inference, quality; report + plots."""
    from train.report import evaluate_and_report

    cfg = _load(config_path, overrides)
    with _run_dir_held(cfg, "evaluate") as log:
        evaluate_and_report(cfg, compare=compare, force=force, log=log)


@main.command("sft")
@_config_options
@_address_option
@click.option(
    "--dataset",
    "dataset_path",
    type=click.Path(exists=True),
    default=None,
    help="Parquet file or directory (default: this run's stage-2 dataset).",
)
def sft_command(
    config_path: str | None,
    overrides: tuple[str, ...],
    address: str | None,
    dataset_path: str | None,
) -> None:
    """Stage 3: supervised fine-tuning on Ray Train (FSDP or DDP)."""
    cfg = _load(config_path, overrides)
    with _run_dir_held(cfg, "sft") as log:
        _init_ray(address)
        from train.sft import run_sft

        final = run_sft(cfg, dataset_path=dataset_path, log=log)
    click.echo(f"sft: Hugging Face model directory at {final}")


@main.command("pipeline")
@_config_options
@_address_option
def pipeline_command(
    config_path: str | None, overrides: tuple[str, ...], address: str | None
) -> None:
    """All stages in order; finished stages are skipped, partial ones resumed."""
    from rl_system.pipeline import run_pipeline
    from rl_system.policy import load_seed_instructions

    cfg = _load(config_path, overrides)
    load_seed_instructions(cfg)  # bad or empty seeds fail here, before Ray starts
    with _run_dir_held(cfg, "pipeline") as log:
        _init_ray(address)
        run_pipeline(cfg, log=log)
    click.echo(f"pipeline: done; report at {cfg.stage_dir('eval') / 'report.md'}")


@main.command("reviewer-check")
@_config_options
@_address_option
@click.option(
    "--modes",
    "modes",
    multiple=True,
    metavar="MODE[,MODE]",
    help="Judge modes to score (repeatable or comma-separated; default: every mode of "
    "rl_system.judges: equality, preference, rating, cot).",
)
@click.option(
    "--pairs",
    "pairs_path",
    type=click.Path(dir_okay=False),
    default="data/reviewer_pairs.jsonl",
    show_default=True,
    help="Labelled (before, after) pairs, JSONL: id, category, before, after, good, note.",
)
def reviewer_check_command(
    config_path: str | None,
    overrides: tuple[str, ...],
    address: str | None,
    modes: tuple[str, ...],
    pairs_path: str,
) -> None:
    """Measure each judge mode (and a word-count baseline) on labelled pairs: AUC, bias."""
    from rl_system.reviewer_check import (
        OUT_SUBDIR,
        format_table,
        load_pairs,
        resolve_modes,
        run_check,
        write_report,
    )
    cfg = _load(config_path, overrides)
    pairs, chosen = load_pairs(pairs_path), resolve_modes(modes)  # before Ray starts
    _init_ray(address)
    from serve.client import LLMClient

    _roles_up(cfg)
    out_dir = cfg.run_dir / OUT_SUBDIR
    from rl_system.encoders import TextEncoder

    report = run_check(
        LLMClient.from_config(cfg, "reviewer"), pairs, modes=chosen,
        min_info_gain=cfg.policy.reward.min_info_gain, log=click.echo,
        on_mode_done=lambda partial: write_report(partial, out_dir),
        text_encoder=TextEncoder(cfg.models.encoder), reward=cfg.policy.reward,
    )
    paths = write_report(report, out_dir)
    click.echo(format_table(report))
    click.echo(f"reviewer-check: wrote {paths['json']} and {paths['png']}")


if __name__ == "__main__":
    main()
