import pytest
from pydantic import ValidationError

from conftest import REPO
from rlhfkit.config import (
    DPOConfig,
    EpochTrainerConfig,
    PolicyTrainerConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    SimulateConfig,
    TrainerConfig,
    load_config,
    parse_overrides,
)
from rlhfkit.errors import ConfigError
from rlhfkit.pipeline import PipelineConfig, stage_configs


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


COMMAND_CONFIGS = {"sft.yaml": SFTConfig, "reward.yaml": RewardConfig, "dpo.yaml": DPOConfig, "ppo.yaml": PPOConfig,
                   "simulate.yaml": SimulateConfig}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    """A command's config as that command reads it; a pipeline's with every stage's settings validated."""
    if path.name in COMMAND_CONFIGS:
        load_config(COMMAND_CONFIGS[path.name], path)
    else:
        assert stage_configs(load_config(PipelineConfig, path))


TRAINERS = {SFTConfig: {"train_file": "t", "output_dir": "o"}, RewardConfig: {"train_file": "t", "output_dir": "o"},
            DPOConfig: {"train_file": "t", "output_dir": "o"},
            PPOConfig: {"model": "m", "prompts_file": "p", "output_dir": "o", "rewards": [{"scorer": "toxicity"}]}}


def test_the_trainers_share_their_run_settings_and_keep_their_own_defaults():
    """The run, optimiser, logging and LoRA settings are declared once (TrainerConfig; the epoch schedule in
    EpochTrainerConfig, QLoRA in PolicyTrainerConfig); each trainer states only the defaults it changes, and they are
    what each trainer had."""
    for cls in TRAINERS:
        assert issubclass(cls, TrainerConfig)
        for base in (TrainerConfig, EpochTrainerConfig, PolicyTrainerConfig):
            assert not set(cls.__annotations__) & set(base.model_fields), (cls, base)
    assert all(issubclass(cls, EpochTrainerConfig) for cls in (SFTConfig, RewardConfig, DPOConfig))
    sft, reward, dpo, ppo = (cls(**required) for cls, required in TRAINERS.items())
    assert [c.warmup_ratio for c in (sft, reward, dpo, ppo)] == [0.05, 0.05, 0.1, 0.0]
    assert [c.learning_rate for c in (sft, reward, dpo, ppo)] == [2e-4, 1e-5, 5e-5, 1e-5]
    assert [c.lr_scheduler for c in (sft, reward, dpo, ppo)] == ["cosine", "linear", "linear", "linear"]
    assert [c.log_every for c in (sft, reward, dpo, ppo)] == [5, 5, 5, 1]
    assert [(c.lora.enabled, c.lora.dropout) for c in (sft, reward, dpo, ppo)] == [
        (True, 0.05), (False, 0.05), (True, 0.0), (True, 0.0)]
    assert TrainerConfig.model_fields["warmup_ratio"].default == 0.05  # a subclass's default leaves the base's alone
    with pytest.raises(ValidationError, match="warmup_ratio"):
        DPOConfig(**TRAINERS[DPOConfig], warmup_ratio=1.5)  # the base's constraints hold under a changed default
    with pytest.raises(ValidationError, match="merge_adapter needs lora.enabled"):
        PPOConfig(**TRAINERS[PPOConfig], merge_adapter=True, lora={"enabled": False})
