"""TRPO on RLlib's new API stack (DESIGN §3 "TRPO").

`TRPOConfig` and `TRPO` import Ray lazily, so that `rl_system.trpo.cg` (the pure
torch math) stays importable without Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rl_system.trpo.trpo import TRPO, TRPOConfig

__all__ = ["TRPO", "TRPOConfig"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rl_system.trpo import trpo

        return getattr(trpo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
