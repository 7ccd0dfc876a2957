"""infra.validation: one formatter for pydantic errors (config file, web config)."""

from __future__ import annotations

import pydantic
import pytest
from pydantic import BaseModel, ConfigDict, field_validator

from virtwatch.infra.validation import format_validation_errors


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    port: int = 0

    @field_validator("port")
    @classmethod
    def _port(cls, v: int) -> int:
        if v > 65535:
            raise ValueError(f"port {v} is out of range")
        return v


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Inner = Inner()


def errors_of(data: object) -> pydantic.ValidationError:
    with pytest.raises(pydantic.ValidationError) as info:
        Outer.model_validate(data)
    return info.value


def test_paths_unknown_keys_and_validator_words() -> None:
    err = errors_of({"inner": {"port": 70000, "prot": 1}, "bogus": 2})
    assert format_validation_errors(err) == ["inner.port: port 70000 is out of range", "inner.prot: unknown key",
                                             "bogus: unknown key"]
    assert format_validation_errors(err, unknown_key="unknown or unsupported key")[1:] == [
        "inner.prot: unknown or unsupported key", "bogus: unknown or unsupported key"]


def test_a_problem_without_a_location_is_the_top_level() -> None:
    assert format_validation_errors(errors_of([1, 2])) == [
        "(top level): Input should be a valid dictionary or instance of Outer"]
