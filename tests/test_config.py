"""Config loading: frozen dataclasses, unknown keys named, dotted overrides, presets."""
import dataclasses

import pytest

from latentdiff.io.config import CONFIG_DIR, ConfigError, DiffusionConfig, ModelConfig, from_dict, load_model_config, load_yaml, merge, parse_overrides, to_dict


def test_from_dict_builds_nested_frozen_dataclasses():
    cfg = from_dict(ModelConfig, {"unet": {"model_channels": 64, "channel_mult": [1, 2]},
                                  "diffusion": {"prediction": "v_prediction", "beta_end": "1.2e-2"}})
    assert cfg.unet.model_channels == 64 and cfg.unet.channel_mult == (1, 2)
    assert cfg.diffusion == DiffusionConfig(prediction="v_prediction", beta_end=0.012)
    assert cfg.vae == ModelConfig().vae  # untouched sections keep their defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"


def test_unknown_keys_are_named_with_their_section():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) model\.unet\.bogus, model\.unet\.zzz") as e:
        from_dict(ModelConfig, {"unet": {"bogus": 1, "zzz": 2}}, "model")
    assert "model_channels" in str(e.value)  # and lists the valid ones
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(ModelConfig, {"unett": {}})


@pytest.mark.parametrize("section, value, message", [
    ({"unet": {"model_channels": "wide"}}, None, "unet.model_channels: expected an integer"),
    ({"unet": {"channel_mult": 3}}, None, "unet.channel_mult: expected a list"),
    ({"unet": {"use_linear_in_transformer": "maybe"}}, None, "expected true/false"),
    ({"diffusion": {"beta_start": [1]}}, None, "diffusion.beta_start: expected a number"),
])
def test_type_errors_name_the_key(section, value, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        from_dict(ModelConfig, section)


def test_round_trip_through_plain_dicts():
    cfg = from_dict(ModelConfig, {"name": "x", "unet": {"attention_resolutions": [2]}})
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


def test_dotted_overrides():
    over = parse_overrides(["--unet.model_channels=128", "--train.lr", "1e-4", "--train.flag=true"])
    assert over == {"unet": {"model_channels": 128}, "train": {"lr": "1e-4", "flag": True}}
    assert merge({"unet": {"a": 1, "b": 2}}, over)["unet"] == {"a": 1, "b": 2, "model_channels": 128}
    with pytest.raises(ConfigError, match="--section.key=value"):
        parse_overrides(["unet.model_channels=1"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.lr"])


def test_yaml_files_and_presets(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("model:\n  name: mine\n  unet:\n    model_channels: 96\n")
    cfg = load_model_config(f, {"unet": {"num_res_blocks": 1}})
    assert (cfg.name, cfg.unet.model_channels, cfg.unet.num_res_blocks) == ("mine", 96, 1)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    # every bundled preset parses (a typo in a shipped YAML fails here, not in a user's hands)
    presets = sorted(CONFIG_DIR.glob("*.yaml"))
    for p in presets:
        if "model" in load_yaml(p):
            load_model_config(p)


def test_bare_no_in_yaml_is_the_string_choice_not_a_boolean(tmp_path):
    """YAML 1.1 reads `no` as False: `--train.mixed_precision=no` must still select "no"."""
    from latentdiff.train.config import TrainConfig
    cfg = from_dict(TrainConfig, parse_overrides(["--mixed_precision=no"]), "train")
    assert cfg.mixed_precision == "no"
