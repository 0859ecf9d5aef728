"""The adaptive-τ controller against a simulated device, and the `adaptive` config section."""

import math
import random

import pytest
from pydantic import ValidationError

from sparsevar.adaptive import AdaptiveConfig, Controller, Curve, per_actor_latency_ms
from workflows.adaptive_report import AdaptiveReport
from workflows.config import ConfigError, load_config

TINY = "configs/tiny-random.yaml"
GRID = [i / 10 for i in range(11)]


def device_ms(tau: float) -> float:
    """Simulated latency per image of a device: dense 1000 ms, falling smoothly to 250 ms at τ = 1."""
    return 250.0 + 750.0 * (1.0 - min(tau, 1.0)) ** 1.5


CURVE = Curve.fit(GRID, [device_ms(t) for t in GRID], [60.0 - 30.0 * t for t in GRID])


def drive(controller: Controller, batches: int, slowdown: float = 1.0, noise: float = 0.0, seed: int = 0,
          batch_size: int = 4) -> tuple[list[float], list[float]]:
    """Run the controller on the simulated device; returns each batch's τ and latency per image."""
    rng = random.Random(seed)
    taus, per_image = [], []
    for _ in range(batches):
        tau = controller.next_tau()
        ms = device_ms(tau) * slowdown * math.exp(rng.gauss(0.0, noise))
        controller.observe(tau, ms * batch_size, batch_size)
        taus.append(tau)
        per_image.append(ms)
    return taus, per_image


def test_curve_is_fitted_monotone_and_inverted():
    noisy = Curve.fit([0.5, 0.0, 1.0, 0.25, 0.75], [600.0, 1000.0, 300.0, 1100.0, 320.0])
    assert noisy.taus == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert noisy.latency_ms == (1050.0, 1050.0, 600.0, 320.0, 300.0)  # 1000 and 1100 pooled
    assert noisy.latency(0.625) == pytest.approx(460.0)
    assert noisy.latency(-1.0) == 1050.0 and noisy.latency(3.0) == 300.0  # flat beyond the ends
    assert noisy.smallest_tau(460.0, 0.0, 1.0) == pytest.approx(0.625)
    assert noisy.smallest_tau(1050.0, 0.0, 1.0) == 0.0  # the flat start: the lowest τ wins
    assert noisy.smallest_tau(2000.0, 0.3, 1.0) == 0.3
    assert noisy.smallest_tau(100.0, 0.0, 0.9) == 0.9  # unreachable: the bound


@pytest.mark.parametrize("slowdown", [1.0, 1.3, 0.8])
def test_converges_within_a_few_batches_and_holds_within_five_percent(slowdown):
    target = device_ms(0.5) * slowdown  # reachable on this device
    taus, per_image = drive(Controller(CURVE, target), 40, slowdown)
    assert all(abs(ms / target - 1) <= 0.05 for ms in per_image[5:]), per_image[:8]
    assert taus[-1] == pytest.approx(0.5, abs=0.01)


def test_holds_the_target_on_a_noisy_device():
    target = device_ms(0.4) * 1.2
    _, per_image = drive(Controller(CURVE, target), 200, slowdown=1.2, noise=0.1, seed=1)
    for start in range(10, 200, 20):  # throughput over each run of 20 batches after settling
        window = per_image[start:start + 20]
        assert abs(sum(window) / len(window) / target - 1) <= 0.05


def test_slow_batches_do_not_swing_tau_but_a_lasting_slowdown_is_followed():
    controller = Controller(CURVE, device_ms(0.5))
    assert controller.next_tau() == pytest.approx(0.5)
    controller.observe(0.5, device_ms(0.5) * 10 * 4, 4)  # a cold start: ten times slower
    assert controller.next_tau() == pytest.approx(0.5)
    taus, _ = drive(controller, 6)
    assert taus == pytest.approx([0.5] * 6)
    for _ in range(2):  # two slow batches in a row are still noise
        controller.observe(0.5, device_ms(0.5) * 3 * 4, 4)
        assert controller.next_tau() == pytest.approx(0.5)
    target = device_ms(0.7)
    controller = Controller(CURVE, target)
    taus, per_image = drive(controller, 6, slowdown=1.3)  # the device turns 30% slower than calibrated
    assert taus[0] == pytest.approx(0.7) and taus[3] == pytest.approx(CURVE.smallest_tau(target / 1.3, 0, 1), abs=0.01)
    assert controller.missed_by == 0 and abs(per_image[-1] / target - 1) <= 0.05


def test_never_leaves_its_bounds():
    rng = random.Random(2)
    for _ in range(50):
        tau_min = rng.uniform(0.0, 0.5)
        tau_max = rng.uniform(tau_min, 1.2)
        controller = Controller(CURVE, rng.uniform(100.0, 2000.0), tau_min, tau_max)
        taus, _ = drive(controller, 20, slowdown=rng.uniform(0.3, 3.0), noise=0.5, seed=rng.randrange(1000))
        assert all(tau_min <= tau <= tau_max for tau in taus)


def test_unreachable_target_runs_at_the_bound_and_reports_the_miss():
    target = device_ms(0.8) * 1.5 * 0.9  # on a device 1.5x slower, 10% less time than τ = 0.8 takes
    controller = Controller(CURVE, target, 0.0, 0.8)
    taus, per_image = drive(controller, 30, slowdown=1.5)
    assert taus[-10:] == [0.8] * 10
    assert controller.missed_by == pytest.approx(1 - target / per_image[-1], abs=0.01)
    assert controller.missed_by == pytest.approx(0.1, abs=0.01)
    assert Controller(CURVE, device_ms(0.5)).missed_by == 0.0


def test_target_slower_than_dense_runs_at_tau_min():
    taus, _ = drive(Controller(CURVE, device_ms(0.0) * 2, tau_min=0.1), 10)
    assert taus == [0.1] * 10
    taus, _ = drive(Controller(CURVE, device_ms(0.0) * 2), 10)
    assert taus == [0.0] * 10


def test_min_psnr_caps_tau():
    controller = Controller(CURVE, 1.0, min_psnr=45.0)  # PSNR 60 - 30 τ reaches 45 dB up to τ = 0.5
    assert controller.upper == 0.5
    assert drive(controller, 5)[0] == [0.5] * 5
    with pytest.raises(ValueError, match="below adaptive.tau_min"):
        Controller(CURVE, 1.0, tau_min=0.6, min_psnr=45.0)
    with pytest.raises(ValueError, match="no calibrated τ reaches"):
        Controller(CURVE, 1.0, min_psnr=70.0)


def test_job_target_is_shared_evenly_by_the_actors():
    assert per_actor_latency_ms(AdaptiveConfig(target_images_per_sec=2.0), 3) == 1500.0
    assert per_actor_latency_ms(AdaptiveConfig(target_latency_ms=900.0), 3) == 900.0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"enabled": True, "calibration": "c"}, "exactly one of"),
        ({"enabled": True, "calibration": "c", "target_latency_ms": 1, "target_images_per_sec": 1}, "exactly one of"),
        ({"enabled": True, "target_latency_ms": 900}, "calibration is required"),
        ({"tau_min": 0.8, "tau_max": 0.5}, "tau_min=0.8 is above tau_max=0.5"),
        ({"target_images_per_sec": 0}, "greater than 0"),
        ({"tau_maxx": 1}, "Extra inputs"),
    ],
)
def test_adaptive_config_rejects_inconsistent_settings(fields, message):
    with pytest.raises(ValidationError, match=message):
        AdaptiveConfig(**fields)


ADAPTIVE = ("adaptive.enabled=true", "adaptive.target_images_per_sec=2", "adaptive.calibration=out/calibration")


def test_adaptive_runs_default_to_quantile_unless_normalize_is_given(tmp_path):
    assert load_config(TINY, list(ADAPTIVE)).sparsevar.normalize == "minmax"  # tiny.yaml sets minmax itself
    bare = tmp_path / "bare.yaml"
    bare.write_text("model: {backend: tiny}\n")
    assert load_config(bare).sparsevar.normalize == "minmax"
    assert load_config(bare, list(ADAPTIVE)).sparsevar.normalize == "quantile"
    assert load_config(bare, [*ADAPTIVE, "sparsevar.normalize=minmax"]).sparsevar.normalize == "minmax"


def test_adaptive_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="adaptive: .*exactly one of"):
        load_config(TINY, ["adaptive.enabled=true", "adaptive.calibration=x"])
    with pytest.raises(ConfigError, match="needs sparsevar.enabled"):
        load_config(TINY, [*ADAPTIVE, "sparsevar.enabled=false"])


def _report(at_bound: float, tau_bound: float, missed_by: float = 0.2) -> AdaptiveReport:
    return AdaptiveReport(target_images_per_sec=2.0, target_latency_ms=500.0, achieved_images_per_sec=1.6,
                          predicted_max_images_per_sec=2.5, tau_bound=tau_bound, tau_mean=0.3, tau_median=0.3,
                          tau_lowest=0.0, tau_highest=tau_bound if at_bound else 0.5, at_bound=at_bound,
                          missed_by=missed_by)


def test_missed_target_advice_fits_where_tau_was():
    held_below = str(_report(at_bound=0.0, tau_bound=1.0))
    assert "target missed by 20.0%" in held_below and "τ never reached its bound" in held_below
    assert "tau_max" not in held_below
    assert "raise adaptive.tau_max" in str(_report(at_bound=0.8, tau_bound=0.7))
    at_one = str(_report(at_bound=0.8, tau_bound=1.0))
    assert "tau_max" not in at_one and "lower the target or add actors" in at_one
    assert "missed" not in str(_report(at_bound=0.0, tau_bound=1.0, missed_by=0.0))
