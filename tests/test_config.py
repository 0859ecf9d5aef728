"""Job configs: YAML plus --set overrides, validated before any work starts, errors named by key."""

import pytest

from workflows.config import ConfigError, apply_override, load_config

TINY = "configs/tiny-random.yaml"


@pytest.mark.parametrize(("path", "last_map"), [("configs/tiny.yaml", 16), (TINY, 32)])
def test_shipped_tiny_configs_are_valid_and_leave_three_sparse_stages(path, last_map):
    cfg = load_config(path)
    assert cfg.model.backend == "tiny"
    assert len(cfg.model.patch_sizes) >= 10 and cfg.model.patch_sizes[-1] == last_map
    assert len(cfg.model.patch_sizes) - cfg.sparsevar.start_stage + 1 >= 3
    assert cfg.sparsevar.enabled


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(TINY, ["sparsevar.tau=0", "sparsevar.enabled=false", "model.patch_sizes=[1, 2, 4]",
                             "output.image_format=jpeg"])
    assert cfg.sparsevar.tau == 0.0 and cfg.sparsevar.enabled is False
    assert cfg.model.patch_sizes == [1, 2, 4]
    assert cfg.output.image_format == "jpeg"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("sparsevar.taux=1", "sparsevar.taux: unknown key"),
        ("model.dimm=3", "model.dimm: unknown key"),
        ("sparsevar.tau=-1", "sparsevar.tau"),
        ("sparsevar.normalize=zscore", "sparsevar.normalize"),
        ("ray.batch_size=0", "ray.batch_size"),
        ("model.backend=nonesuch", "model"),
        ("model.patch_sizes=[2, 4]", "model.patch_sizes"),
        ("output.format=tar", "output.format: Input should be 'files' or 'webdataset'"),
        ("output.shard_size=0", "output.shard_size"),
    ],
)
def test_bad_keys_and_values_are_rejected_by_name(override, named):
    with pytest.raises(ConfigError, match="invalid config") as info:
        load_config(TINY, [override])
    assert named in str(info.value)


def test_malformed_override_and_missing_file_explain_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_override({}, "sparsevar.tau")
    with pytest.raises(ConfigError, match="not a section"):
        apply_override({"sparsevar": 1}, "sparsevar.tau=1")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_an_unknown_or_missing_backend_is_named_with_the_valid_ones_not_the_whole_section(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, ["model.backend=nonesuch"])
    message = str(info.value)
    assert "model.backend: unknown backend 'nonesuch'; use one of 'tiny', 'infinity', 'hart'" in message
    assert "patch_sizes" not in message  # the rest of the model section is not dumped
    config = tmp_path / "no-backend.yaml"
    config.write_text("model:\n  dim: 64\n")
    with pytest.raises(ConfigError, match="model.backend: missing; use one of 'tiny', 'infinity', 'hart'"):
        load_config(config)
