"""Stage 2: build the instruction/response dataset on Ray Data.

    teams-rl build-dataset --config configs/demo.yaml

Seeds (``dataset.seeds``) stream through two actor-pool stages: ``evolve`` (the strategy
picks evolution actions; the expert rewrites, the reviewer reviews, the rules drop
failures) and ``respond`` (the expert answers every surviving candidate). The driver then
removes duplicates and writes, under ``runs/<name>/dataset/``, parquet shards, Alpaca and
chat exports, a dataset card and the stage manifest. Every model call goes through a
request-hash resume cache, and the expert's paid calls through
``dataset.max_expert_queries``: a re-run with the same config replays cached answers and
yields the same rows; a changed config is refused.

One module per concern:

- ``build``: the driver (``check_inputs``, ``dataset_is_done``, ``build_dataset``) and
  the config fingerprint;
- ``actors``: one seed's episode and the Ray Data stage actors, and why they are actors
  rather than ``ray.data.llm`` processors;
- ``cache``: the resume cache, request hashes and sampling seeds, the query budget;
- ``outputs``: pair ids, dedupe, the parquet schema, exports and card, the seed tally, the
  summary table and the stage's metrics.
"""

from rl_system.dataset.actors import (
    EpisodeResult,
    EvolveStage,
    RespondStage,
    response_messages,
    run_episode,
)
from rl_system.dataset.build import (
    STAGE,
    DatasetIncomplete,
    DatasetRunMismatch,
    build_dataset,
    check_inputs,
    config_hash,
    dataset_is_done,
)
from rl_system.dataset.cache import (
    CACHE_DIR,
    BudgetExhausted,
    CachedRole,
    RequestCache,
    request_key,
    request_seed,
)
from rl_system.dataset.outputs import (
    DATA_DIR,
    SeedTally,
    dedupe,
    empty_reason,
    format_summary,
    pair_id,
    row_schema,
)

__all__ = [
    "CACHE_DIR",
    "DATA_DIR",
    "STAGE",
    "BudgetExhausted",
    "CachedRole",
    "DatasetIncomplete",
    "DatasetRunMismatch",
    "EpisodeResult",
    "EvolveStage",
    "RequestCache",
    "RespondStage",
    "SeedTally",
    "build_dataset",
    "check_inputs",
    "config_hash",
    "dataset_is_done",
    "dedupe",
    "empty_reason",
    "format_summary",
    "pair_id",
    "request_key",
    "request_seed",
    "response_messages",
    "row_schema",
    "run_episode",
]
