"""ServingConfig: validation, the strict loader, and the Serve options it produces."""

from __future__ import annotations

import pytest

from serving.config import AutoscalingConfig, ServingConfig


def test_defaults_are_valid_and_deploy_a_fixed_replica_count() -> None:
    config = ServingConfig()
    options = config.deployment_options()
    assert options["num_replicas"] == 1 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {
        "num_cpus": 1.0, "runtime_env": {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}}
    assert options["max_ongoing_requests"] == config.max_ongoing_requests
    assert config.max_candidates == 1000 and config.torch_threads == 1


def test_serves_own_user_code_thread_is_one_switch_away() -> None:
    options = ServingConfig.from_dict({"user_code_thread": True}).deployment_options()
    assert options["ray_actor_options"] == {"num_cpus": 1.0}  # Ray Serve's default: nothing to set
    with pytest.raises(ValueError, match="serving.user_code_thread must be true or false"):
        ServingConfig.from_dict({"user_code_thread": "yes"})


def test_autoscaling_replaces_the_fixed_count() -> None:
    config = ServingConfig.from_dict({"autoscaling": {"min_replicas": 1, "max_replicas": 4,
                                                      "target_ongoing_requests": 16}, "num_cpus": 2})
    options = config.deployment_options()
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16,
                                             "upscale_delay_s": 5.0, "downscale_delay_s": 60.0}
    assert config.torch_threads == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"max_candidate": 10}, "serving.max_candidate"),
        ({"autoscaling": {"max_replica": 3}}, "serving.autoscaling.max_replica"),
        ({"task_weights": {"share": 1.0}}, "unknown task(s) ['share']"),
        ({"task_weights": {"click": float("nan")}}, "serving.task_weights.click must be a finite number"),
        ({"task_weights": {"click": 0.0}}, "non-zero weight"),
        ({"max_candidates": 5000}, "max_batch_candidates (4096) must be >= max_candidates (5000)"),
        ({"max_candidates": True}, "serving.max_candidates must be an integer"),
        ({"num_replicas": 2, "autoscaling": {}}, "exclude each other"),
        ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "must be >= min_replicas"),
        ({"max_body_bytes": 10}, "serving.max_body_bytes must be >= 1024"),
        ({"access_log": "yes"}, "serving.access_log must be true or false"),
        ({"follower_nice": -1}, "serving.follower_nice must be >= 0"),
        ({"follower_nice": 20}, "serving.follower_nice must be <= 19"),
        ({"follower_nice": 2.5}, "serving.follower_nice must be an integer"),
        ({"follower_nice_scope": "python"}, "serving.follower_nice_scope must be one of ['bulk', 'all'], got 'python'"),
        ({"follower_nice_scope": None}, "serving.follower_nice_scope must be one of ['bulk', 'all'], got None"),
        ({"switch_interval_ms": 0}, "serving.switch_interval_ms must be >= 0.01"),
        ({"switch_interval_ms": "fast"}, "serving.switch_interval_ms must be a finite number"),
        ({"switch_interval_ms": float("inf")}, "serving.switch_interval_ms must be a finite number"),
    ],
)
def test_bad_config_is_refused_with_its_path(data: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        ServingConfig.from_dict(data)
    assert message in str(info.value)


def test_autoscaling_config_is_typed() -> None:
    with pytest.raises(ValueError, match="target_ongoing_requests"):
        AutoscalingConfig(target_ongoing_requests=0)
