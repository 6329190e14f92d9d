"""Typed run parameters shared by every flow (and `python -m flows.pipeline`).

The flows take these as flat, typed parameters (so `prefect deployment run ... --param profile=demo`
works and the Prefect UI shows a form: a dropdown for the profile, a JSON editor for the overrides,
switches for the flags); `RunParameters` is the one model that validates them, and it validates the
overrides through `pipeline.config.load_profile`, so a bad key fails before any stage runs, with the
dotted key named.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import CONFIG_DIR, Config, ConfigError, load_profile


def profile_names() -> tuple[str, ...]:
    """Every profile in configs/ (yours too: add configs/mycomp.yaml and it is a choice)."""
    return tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))


# A Literal built from the folder, so the Prefect UI still shows a dropdown of the profiles there.
Profile = Literal[profile_names()]  # type: ignore[valid-type]


class RunParameters(BaseModel):
    """What one pipeline run is asked to do."""

    model_config = ConfigDict(extra="forbid")

    profile: Profile = Field("demo", description="configs/<profile>.yaml: statefarm (GPU, real data), demo (CPU, synthetic State Farm), "
                                                "demo-csv (CPU, synthetic CSV layout), smoke (tests), or your own")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description='config deltas over the profile, dotted keys or nested: {"head.max_epochs": 3}',
    )
    submit: bool = Field(False, description="upload to Kaggle (sets submit.enabled=true); otherwise the submit stage is a dry run")
    push: bool = Field(True, description="dvc push the outputs to the configured DVC remote after a successful run")
    pull: bool = Field(False, description="dvc repro --pull: restore stages another worker already ran from the remote's run cache")
    fanout_pool: str | None = Field(None, description="run the per-fold stages on this work pool's workers "
                                                      "(sets fanout.enabled and fanout.work_pool); empty: as the config says")

    def config_overrides(self) -> dict[str, Any]:
        """The overrides the config is resolved with: the user's plus ``submit.enabled`` (and the fan-out pool)."""
        pool = {"fanout.enabled": True, "fanout.work_pool": self.fanout_pool} if self.fanout_pool else {}
        return {**self.overrides, "submit.enabled": self.submit, **pool}

    def config(self) -> Config:
        """The resolved config; ``ConfigError`` names the offending key."""
        try:
            return load_profile(self.profile, self.config_overrides())
        except ConfigError as err:
            raise ConfigError(f"configure: {err}") from None
