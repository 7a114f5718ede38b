import json
from pathlib import Path

import pytest
import torch

from rlhfkit.config import LoraSettings
from rlhfkit.errors import ConfigError, ModelNotFoundError
from rlhfkit.models import apply_lora, load_causal_lm, load_tokenizer, resolve_model


def test_local_directory_loads(tiny_model):
    model = load_causal_lm(tiny_model)
    assert type(model).__name__ == "LlamaForCausalLM"
    tokenizer = load_tokenizer(tiny_model)
    assert tokenizer.pad_token is not None and tokenizer.chat_template


def test_unknown_model_names_everything_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        load_causal_lm("no-such-org/no-such-model")
    message = str(e.value)
    assert "bundled alias" in message and "smollm2-135m-instruct" in message
    assert "local directory" in message and "hub id" in message


def test_a_directory_without_a_model_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        resolve_model(str(tmp_path))


def test_adapter_directory_loads_its_base_and_the_adapter(tiny_model, tmp_path):
    model = apply_lora(load_causal_lm(tiny_model), LoraSettings(r=2, alpha=4))
    with torch.no_grad():  # make the adapter non-trivial so that it changes the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(Path(tiny_model).resolve())
    reloaded = load_causal_lm(str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    assert not torch.allclose(load_causal_lm(tiny_model)(ids).logits, model(ids).logits)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_qlora_without_cuda_says_why(tiny_model):
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_causal_lm(tiny_model, load_in_4bit=True)


def test_an_adapter_finds_its_base_again_after_the_bundled_cache_or_its_run_directory_moved(tiny_model, tmp_path, monkeypatch):
    import shutil

    old_cache, new_cache = tmp_path / "old-cache", tmp_path / "new-cache"
    shutil.copytree(tiny_model, old_cache / "models" / "smollm2-135m-instruct")
    monkeypatch.setenv("RLHFKIT_CACHE", str(old_cache))
    model = apply_lora(load_causal_lm("smollm2-135m-instruct"), LoraSettings(r=2, alpha=4))
    model.save_pretrained(tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((old_cache / "models" / "smollm2-135m-instruct").resolve())  # loadable by peft alone
    shutil.move(old_cache, new_cache)  # another machine, or another $RLHFKIT_CACHE
    monkeypatch.setenv("RLHFKIT_CACHE", str(new_cache))
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(load_causal_lm(str(tmp_path / "adapter"))(ids).logits, model.eval()(ids).logits)

    # a run directory that carries its base (PPO's base/) moves as a whole
    run = tmp_path / "run"
    load_causal_lm(tiny_model).save_pretrained(run / "base")
    load_tokenizer(tiny_model).save_pretrained(run / "base")
    on_base = apply_lora(load_causal_lm(str(run / "base")), LoraSettings(r=2, alpha=4))
    on_base.save_pretrained(run)
    shutil.move(run, tmp_path / "moved")
    assert type(load_causal_lm(str(tmp_path / "moved"))).__name__ == "PeftModelForCausalLM"
