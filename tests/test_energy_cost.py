import time

import pytest
import torch

from frugalm.errors import ConfigError
from frugalm.measure import energy
from frugalm.measure.cost import get_profile, grams_co2e, load_profiles, usd
from frugalm.measure.energy import EnergyMeter

CPU = torch.device("cpu")


def test_builtin_profiles_are_complete():
    profiles = load_profiles()
    assert {"cloud-cpu-2vcpu", "cloud-h100", "laptop"} <= set(profiles)
    assert get_profile(None, "cpu").name == "cloud-cpu-2vcpu" and get_profile(None, "cuda").name == "cloud-h100"


def test_profile_with_missing_fields_names_them(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("mine:\n  description: my box\n  usd_per_hour: 1.0\n")
    with pytest.raises(ConfigError) as info:
        load_profiles(path)
    msg = str(info.value)
    assert "profile 'mine'" in msg and "usd_per_kwh" in msg and "watts_max" in msg and "\n" not in msg


def test_user_profile_file_adds_profiles(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "box:\n  description: d\n  usd_per_hour: 0.5\n  usd_per_kwh: 0.2\n  gco2e_per_kwh: 100\n  watts_idle: 10\n  watts_max: 100\n"
    )
    assert get_profile("box", "cpu", path).usd_per_hour == 0.5
    with pytest.raises(ConfigError, match="unknown hardware profile 'bx'; did you mean 'box'"):
        get_profile("bx", "cpu", path)


def test_prices():
    p = get_profile("laptop", "cpu")
    assert usd(p, 3600, 3.6e6) == pytest.approx(p.usd_per_hour + p.usd_per_kwh)
    assert grams_co2e(p, 3.6e6) == pytest.approx(p.gco2e_per_kwh)


def test_estimate_without_counters_states_its_model(monkeypatch, tmp_path):
    monkeypatch.setenv("FRUGALM_RAPL_ROOT", str(tmp_path))  # no readable counters, whatever the host has
    p = get_profile("cloud-cpu-2vcpu", "cpu")
    with EnergyMeter(CPU, p) as meter:
        end = time.perf_counter() + 0.2
        while time.perf_counter() < end:  # busy: utilization about 1 / logical CPUs
            pass
    assert meter.method == "estimated"
    proto = meter.protocol()
    assert proto["watts_max"] == p.watts_max and 0 < proto["utilization"] <= 1
    watts = meter.joules / meter.wall_s
    assert p.watts_idle <= watts <= p.watts_max


def _fake_rapl(root, uj, span=10**9):
    zone = root / "intel-rapl:0"
    zone.mkdir(exist_ok=True)
    (zone / "energy_uj").write_text(str(uj))
    (zone / "max_energy_range_uj").write_text(str(span))
    return zone


def test_rapl_counter_is_measured_with_wraparound(monkeypatch, tmp_path):
    monkeypatch.setenv("FRUGALM_RAPL_ROOT", str(tmp_path))
    zone = _fake_rapl(tmp_path, 999_000_000)
    p = get_profile("cloud-cpu-2vcpu", "cpu")
    with EnergyMeter(CPU, p) as meter:
        (zone / "energy_uj").write_text("2_000_000".replace("_", ""))  # wrapped past 10^9 uJ
    assert meter.method == "measured"
    assert meter.joules == pytest.approx(3.0)  # 1 J to the wrap + 2 J after
    assert meter.protocol()["zones"] == ["intel-rapl:0"]


def test_the_label_follows_the_counters_given_not_the_host(monkeypatch, tmp_path):
    p = get_profile("cloud-cpu-2vcpu", "cpu")
    (tmp_path / "fabricated").mkdir()
    zone = _fake_rapl(tmp_path / "fabricated", 1_000_000)
    monkeypatch.setenv("FRUGALM_RAPL_ROOT", str(tmp_path / "fabricated"))
    with EnergyMeter(CPU, p) as meter:
        (zone / "energy_uj").write_text("1500000")
        assert meter.so_far() == pytest.approx(0.5)  # read mid-region (a training checkpoint does)
        (zone / "energy_uj").write_text("4000000")
    assert meter.method == "measured" and meter.joules == pytest.approx(3.0)
    monkeypatch.setenv("FRUGALM_RAPL_ROOT", str(tmp_path / "absent"))
    with EnergyMeter(CPU, p) as meter:
        pass
    assert meter.method == "estimated" and meter.protocol()["profile"] == "cloud-cpu-2vcpu"
    monkeypatch.delenv("FRUGALM_RAPL_ROOT")
    monkeypatch.setattr(energy, "RAPL_ROOT", tmp_path / "fabricated")  # without the variable: the module's root
    assert EnergyMeter(CPU, p).method == "measured"
