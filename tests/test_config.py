import pytest

from rlhfkit.config import SFTConfig, load_config, parse_overrides
from rlhfkit.errors import ConfigError


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["epochs=1", "lora.r=8", "lora.enabled=false", "model=a/b", "eval_file="]) == {
        "epochs": 1,
        "lora": {"r": 8, "enabled": False},
        "model": "a/b",
        "eval_file": None,
    }


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: t.jsonl\noutput_dir: out\nlora:\n  r: 4\n  alpha: 8\n")
    cfg = load_config(SFTConfig, path, ["lora.r=2", "learning_rate=1e-3"])
    assert (cfg.lora.r, cfg.lora.alpha, cfg.learning_rate) == (2, 8, 1e-3)


def test_unknown_setting_is_named_with_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_file: t.jsonl\noutput_dir: out\nlora:\n  rank: 4\n")
    with pytest.raises(ConfigError, match=r"lora\.rank: unknown setting \(the settings are: enabled, r, alpha"):
        load_config(SFTConfig, path)


def test_bad_values_and_missing_fields_are_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, ["output_dir=o", "batch_size=0"])
    assert "train_file: Field required" in str(e.value) and "batch_size" in str(e.value)


def test_qlora_needs_lora():
    with pytest.raises(ConfigError, match="load_in_4bit .* lora.enabled"):
        load_config(SFTConfig, None, ["train_file=t", "output_dir=o", "load_in_4bit=true", "lora.enabled=false"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(SFTConfig, tmp_path / "none.yaml")


def test_bundled_sft_config_is_valid():
    from conftest import REPO

    cfg = load_config(SFTConfig, REPO / "configs" / "sft.yaml")
    assert cfg.model == "smollm2-135m-instruct" and cfg.lora.enabled
