"""Which policy applies to a guest, key by key, and where each key came from.

Precedence per key (highest first):

1. runtime override (operator: ``virtwatch override GUEST KEY=VALUE...`` over the daemon socket)
2. the guest's XML metadata in namespace ``https://virtwatch.dev/xmlns/policy/1``
3. ``[[policy.match]]`` rules in file order (the first matching rule that sets a key wins)
4. profiles named by those layers, in the same order (override's, metadata's, rules')
5. ``[policy.defaults]``

A guest is *managed* when a match rule matches it, its metadata carries a
policy element, or it has a runtime override; otherwise it is only observed.

Metadata format (attributes and child elements are equivalent; ``label``
children feed ``metadata`` selectors of match rules)::

    <policy xmlns="https://virtwatch.dev/xmlns/policy/1" profile="critical">
      <on_crash>restart</on_crash>
      <label name="tier">web</label>
    </policy>
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import pydantic

from .config import MODE_RANK, POLICY_KEYS, GuestPolicy, MatchRule, Mode, PolicyOverlay, PolicySettings, overlay_values


@dataclasses.dataclass(frozen=True, slots=True)
class GuestMetadata:
    """Parsed virtwatch metadata of a guest.

    Attributes:
        present: a policy element exists.
        values: per-guest keys it sets (validated).
        profile: profile it names, or None.
        mode: mode it asks for, or None.
        labels: ``label`` name -> text, for match rules' ``metadata`` selectors.
        errors: problems found (an invalid element contributes no keys).
    """

    present: bool = False
    values: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    profile: str | None = None
    mode: str | None = None
    labels: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    errors: tuple[str, ...] = ()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


#: Per-guest keys whose value is a boolean (written as text in the XML metadata).
_BOOL_KEYS = frozenset(k for k, f in GuestPolicy.model_fields.items() if f.annotation is bool)
_XML_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def parse_metadata(xml: str | None) -> GuestMetadata:
    """Parse our metadata element (None/empty: not present). Never raises: problems go to ``errors``."""
    if not xml or not xml.strip():
        return GuestMetadata()
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        return GuestMetadata(present=False, errors=(f"metadata: not XML: {err}",))
    raw: dict[str, Any] = {_local(k): v for k, v in root.attrib.items()}
    labels: dict[str, str] = {}
    errors: list[str] = []
    for child in root:
        tag = _local(child.tag)
        text = (child.text or "").strip()
        if tag == "label":
            if "name" in child.attrib:
                labels[child.attrib["name"]] = text
            else:
                errors.append("metadata: <label> needs a name attribute")
        else:
            raw[tag] = text
    profile = raw.pop("profile", None)
    mode = raw.pop("mode", None)
    if mode is not None and mode not in MODE_RANK:
        errors.append(f"metadata.mode: {mode!r} is not one of enforce, dry-run, observe")
        mode = None
    values: dict[str, Any] = {}
    for key in _BOOL_KEYS & raw.keys():  # XML text: xsd:boolean spellings become booleans
        raw[key] = _XML_BOOLEANS.get(str(raw[key]).strip().lower(), raw[key])
    try:
        values = overlay_values(PolicyOverlay.model_validate(raw))
    except pydantic.ValidationError as err:
        errors.extend(f"metadata.{line}" for line in _validation_lines(err))
    return GuestMetadata(True, MappingProxyType(values), profile, mode, MappingProxyType(labels), tuple(errors))


def rule_matches(rule: MatchRule, name: str, uuid: str, labels: Mapping[str, str]) -> bool:
    """True when every selector the rule sets matches the guest."""
    if rule.uuid is not None and rule.uuid.lower() != uuid.lower():
        return False
    if rule.name is not None and rule.name != name:
        return False
    if rule.glob is not None and not fnmatch.fnmatchcase(name, rule.glob):
        return False
    if rule.regex is not None and not re.fullmatch(rule.regex, name):
        return False
    return rule.metadata is None or all(labels.get(k) == v for k, v in rule.metadata.items())


@dataclasses.dataclass(frozen=True, slots=True)
class Selection:
    """The merged policy of one guest.

    Attributes:
        managed: False when nothing selects the guest (observed only).
        policy: the complete merged :class:`GuestPolicy`.
        sources: key -> where its value came from, e.g. ``"profile critical (via match[0])"``.
        mode: effective mode: the most conservative of ``[policy].mode`` and the guest's mode.
        mode_source: where the mode came from.
        matched: indexes of matching ``[[policy.match]]`` rules.
        errors: problems (bad metadata, unknown profile in metadata...) that were ignored.
    """

    managed: bool
    policy: GuestPolicy
    sources: Mapping[str, str]
    mode: Mode
    mode_source: str
    matched: tuple[int, ...] = ()
    errors: tuple[str, ...] = ()

    def source(self, key: str) -> str:
        """Where ``key`` came from (``"defaults"`` when not recorded)."""
        return self.sources.get(key, "defaults")


def select(
    settings: PolicySettings,
    name: str,
    uuid: str,
    metadata_xml: str | None,
    override: Mapping[str, Any] | None = None,
) -> Selection:
    """Merge the layers for one guest. Pure.

    ``override`` holds per-guest keys plus optional ``profile`` and ``mode`` as
    :func:`validate_override` returns them (JSON values, as the store keeps
    them); its per-guest keys are made typed here through the same model.
    Never raises: invalid metadata or override values are ignored and reported
    in ``errors``.
    """
    errors: list[str] = []
    md = parse_metadata(metadata_xml)
    errors.extend(md.errors)
    override = dict(override or {})
    o_profile = override.pop("profile", None)
    o_mode = override.pop("mode", None)
    if o_mode is not None and (not isinstance(o_mode, str) or o_mode not in MODE_RANK):
        errors.append(f"override.mode: {o_mode!r} is not one of enforce, dry-run, observe")
        o_mode = None
    o_values: dict[str, Any] = {}
    try:
        o_values = overlay_values(PolicyOverlay.model_validate(override))
    except pydantic.ValidationError as err:  # e.g. stored by another version: the override is left out
        errors.extend(f"override.{line}" for line in _validation_lines(err))

    matched = tuple(i for i, r in enumerate(settings.match) if rule_matches(r, name, uuid, md.labels))
    # (label, values, profile, mode) from highest to lowest precedence
    layers: list[tuple[str, dict[str, Any], str | None, str | None]] = []
    if override or o_profile or o_mode:
        layers.append(("override", o_values, o_profile, o_mode))
    if md.present:
        layers.append(("metadata", dict(md.values), md.profile, md.mode))
    for i in matched:
        rule = settings.match[i]
        layers.append((f"match[{i}] ({rule.describe()})", overlay_values(rule), rule.profile, rule.mode))

    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for label, values, _, _ in layers:
        for k, v in values.items():
            if k not in merged:
                merged[k], sources[k] = v, label
    for label, _, prof, _ in layers:
        if prof is None:
            continue
        if prof not in settings.profile:
            errors.append(f"{label}: unknown profile {prof!r} ignored")
            continue
        for k, v in overlay_values(settings.profile[prof]).items():
            if k not in merged:
                merged[k], sources[k] = v, f"profile {prof} (via {label.split(' ')[0]})"
    for k in POLICY_KEYS:
        if k not in merged:
            sources[k] = "defaults"
    policy = settings.defaults.model_copy(update=merged)

    mode: Mode = settings.effective_mode()
    mode_source = "policy.mode" if settings.enabled else "policy.enabled = false"
    for label, _, _, m in layers:
        if m is not None:
            if MODE_RANK[m] > MODE_RANK[mode]:
                mode, mode_source = m, label  # type: ignore[assignment]
            break
    managed = bool(layers)
    if not managed:
        mode, mode_source = "observe", "not managed (no rule, metadata or override selects it)"
    return Selection(managed, policy, MappingProxyType(sources), mode, mode_source, matched, tuple(errors))


def validate_override(values: Mapping[str, Any], settings: PolicySettings) -> dict[str, Any]:
    """Validate runtime override values (per-guest keys, ``profile``, ``mode``) with the
    model of ``[policy.defaults]``: same types and bounds.

    Returns the cleaned mapping in JSON form, as the store persists it (e.g.
    ``on_host_shutdown = "managedsave:30"`` becomes ``[{"action": "managedsave",
    "timeout": 30.0}]``); {} clears. Raises ValueError naming every bad key, one
    ``"key: problem"`` per problem, joined by ``"; "``.
    """
    values = dict(values)
    out: dict[str, Any] = {}
    problems: list[str] = []
    prof = values.pop("profile", None)
    if prof is not None:
        if not isinstance(prof, str) or prof not in settings.profile:
            problems.append(f"profile: unknown profile {prof!r}")
        else:
            out["profile"] = prof
    mode = values.pop("mode", None)
    if mode is not None:
        if not isinstance(mode, str) or mode not in MODE_RANK:
            problems.append(f"mode: {mode!r} is not one of enforce, dry-run, observe")
        else:
            out["mode"] = mode
    try:
        out.update(PolicyOverlay.model_validate(values).model_dump(mode="json", exclude_none=True))
    except pydantic.ValidationError as err:
        problems.extend(_validation_lines(err))
        if any(e["type"] == "extra_forbidden" for e in err.errors()):
            problems.append(f"valid keys: profile, mode, {', '.join(POLICY_KEYS)}")
    if problems:
        raise ValueError("; ".join(problems))
    return out


def _validation_lines(err: pydantic.ValidationError) -> list[str]:
    """One ``"key: problem"`` per error (``unknown key`` for keys the model forbids)."""
    return [f"{'.'.join(str(p) for p in e['loc'])}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in err.errors()]
