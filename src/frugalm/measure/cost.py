"""Money and carbon: hardware profiles, and the price of measured time and energy.

A profile says what an hour of the hardware costs, what electricity costs on top, the grid's
carbon intensity, and (for the energy estimate when no counter is readable) the device's idle
and full-load power. frugalm ships a small table (data/profiles.yaml); users add their own.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from frugalm.assets import PROFILES_PATH
from frugalm.errors import ConfigError, suggest
from frugalm.text.yaml_input import read_yaml_file

USER_PROFILES = Path("~/.config/frugalm/profiles.yaml")
DEFAULT_PROFILE = {"cpu": "cloud-cpu-2vcpu", "cuda": "cloud-h100"}


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    usd_per_hour: float
    usd_per_kwh: float
    gco2e_per_kwh: float
    watts_idle: float
    watts_max: float

    def to_dict(self) -> dict:
        return asdict(self)


_NUMERIC = [f.name for f in fields(HardwareProfile) if f.name not in ("name", "description")]


def _parse_profile(name: str, raw, origin: str) -> HardwareProfile:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: profile '{name}' must be a mapping of fields, got {type(raw).__name__}")
    required = [f.name for f in fields(HardwareProfile) if f.name != "name"]
    missing = [k for k in required if k not in raw]
    unknown = [k for k in raw if k not in required]
    problems = []
    if missing:
        problems.append(f"missing field(s) {', '.join(missing)}")
    if unknown:
        problems.append(f"unknown field(s) {', '.join(unknown)}")
    for key in _NUMERIC:
        value = raw.get(key)
        if key in raw and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            problems.append(f"{key} must be a number >= 0, got {value!r}")
    if problems:
        raise ConfigError(
            f"{origin}: profile '{name}': {'; '.join(problems)}; every profile needs {', '.join(required)}"
        )
    return HardwareProfile(name=name, description=str(raw["description"]), **{k: float(raw[k]) for k in _NUMERIC})


def _read_profiles(path: Path) -> dict[str, HardwareProfile]:
    data = read_yaml_file(path, f"profiles file '{path}'", "fix the path given by --profiles or FRUGALM_PROFILES") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"profiles file '{path}' must map profile names to fields")
    return {str(name): _parse_profile(str(name), raw, str(path)) for name, raw in data.items()}


def load_profiles(extra: str | os.PathLike | None = None) -> dict[str, HardwareProfile]:
    """Built-in profiles, overridden by the user's file and then by `extra` (or FRUGALM_PROFILES)."""
    profiles = _read_profiles(PROFILES_PATH)
    user = USER_PROFILES.expanduser()
    if user.is_file():
        profiles.update(_read_profiles(user))
    extra = extra or os.environ.get("FRUGALM_PROFILES")
    if extra:
        path = Path(extra).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"profiles file '{extra}' does not exist; pass a YAML file of profiles (see `frugalm ls profiles`)"
            )
        profiles.update(_read_profiles(path))
    return profiles


def get_profile(name: str | None, device_type: str, extra: str | os.PathLike | None = None) -> HardwareProfile:
    profiles = load_profiles(extra)
    name = name or DEFAULT_PROFILE[device_type]
    if name not in profiles:
        raise ConfigError(f"unknown hardware profile '{name}'{suggest(name, profiles)}")
    return profiles[name]


def usd(profile: HardwareProfile, seconds: float, joules: float) -> float:
    """Price of `seconds` of the hardware plus `joules` of electricity."""
    return profile.usd_per_hour * seconds / 3600 + profile.usd_per_kwh * joules / 3.6e6


def grams_co2e(profile: HardwareProfile, joules: float) -> float:
    return profile.gco2e_per_kwh * joules / 3.6e6
