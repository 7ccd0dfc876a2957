"""``[policy]`` configuration section (placeholder until the policy engine lands)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PolicySettings(BaseModel):
    """``[policy]``: whether virtwatch acts on guests at all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="act on guests (needs a read-write libvirt connection)")
    mode: Literal["enforce", "dry-run", "observe"] = "enforce"

    def warnings(self) -> list[str]:
        """Valid but suspicious settings, one line each."""
        return []
