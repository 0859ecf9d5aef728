"""The `serve` config section and how a replica's τ follows its queue (pure logic: no Ray, no HTTP)."""

from pathlib import Path

import pytest

from actors.serve import deployment_options
from sparsevar.adaptive import Controller, Curve, queue_budget_ms
from workflows.config import ConfigError, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-random.yaml"


def test_the_budget_shares_what_is_left_of_the_target_among_the_pending_images():
    assert queue_budget_ms(1000, waited_ms=0, pending_images=1) == 1000  # idle: the whole target
    assert queue_budget_ms(1000, waited_ms=200, pending_images=4) == 200
    assert queue_budget_ms(1000, waited_ms=1500, pending_images=2) == 0  # already late: as fast as possible
    assert queue_budget_ms(1000, waited_ms=0, pending_images=0) == 1000


def test_tau_is_dense_when_idle_and_rises_with_the_queue_within_its_bounds():
    curve = Curve.fit([0.0, 0.5, 1.0], [100.0, 60.0, 30.0])
    controller = Controller(curve, target_ms=150, tau_min=0.0, tau_max=0.8)
    taus = [controller.tau_for(queue_budget_ms(150, 0, pending)) for pending in range(1, 7)]
    assert taus[0] == 0.0  # one image: dense meets 150 ms
    assert taus == sorted(taus) and taus[1] > 0.0  # two images need 75 ms each: sparser
    assert taus[-1] == 0.8  # past what τ_max can do: τ_max, never above
    assert controller.tau_for(100.0) == 0.0 and controller.tau_for(60.0) == pytest.approx(0.5)
    controller.observe(0.0, 200.0, 1)  # the device turns out twice as slow as calibrated ...
    controller.observe(0.0, 200.0, 1)
    controller.observe(0.0, 200.0, 1)
    assert controller.tau_for(150.0) > 0.0  # ... so the idle budget no longer allows dense


@pytest.mark.parametrize(("setting", "message"), [
    ("serve.bogus=1", "serve.bogus: unknown key"),
    ("serve.autoscaling_config.bogus=1", "serve.autoscaling_config.bogus: unknown key"),
    ("serve.max_batch_size=0", "serve.max_batch_size"),
    ("serve.target_latency_ms=500", "target_latency_ms needs calibration"),
    ("serve.tau_max=1.5", "serve.tau_max"),
])
def test_a_bad_serve_section_is_refused_by_name(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [setting])


def test_replicas_or_autoscaling_and_tau_bounds_are_checked():
    with pytest.raises(ConfigError, match="num_replicas or autoscaling_config"):
        load_config(CONFIG, ["serve.num_replicas=2", "serve.autoscaling_config={max_replicas: 3}"])
    with pytest.raises(ConfigError, match="tau_min=0.9 is above tau_max=0.5"):
        load_config(CONFIG, ["serve.tau_min=0.9", "serve.tau_max=0.5"])
    with pytest.raises(ConfigError, match="min_replicas=4 is above max_replicas=2"):
        load_config(CONFIG, ["serve.autoscaling_config={min_replicas: 4, max_replicas: 2}"])


def test_the_serve_section_becomes_the_deployments_options():
    fixed = deployment_options(load_config(CONFIG, ["serve.num_replicas=3", "serve.num_gpus_per_replica=0.5",
                                                    "serve.max_queued_requests=7", "serve.retry_after_s=2"]).serve)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert fixed["max_queued_requests"] == 7
    assert fixed["max_ongoing_requests"] == 8 + 7  # the replica refuses past 8 itself, in OpenAI's shape
    assert fixed["backpressure_config"] == {"status_code": 503, "retry_after_s": 2.0}
    scaled = deployment_options(load_config(CONFIG, ["serve.autoscaling_config={min_replicas: 0, max_replicas: 4}"])
                                .serve)
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"]["min_replicas"] == 0 and scaled["autoscaling_config"]["max_replicas"] == 4
