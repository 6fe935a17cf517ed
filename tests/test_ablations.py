"""The ablation runner's bookkeeping: which configs run, their keys, resume and sharing a file."""

from __future__ import annotations

import dataclasses
import json

import pytest

import softprompt.training.loop as loop_module
import softprompt.training.trainer as trainer_module
from softprompt.training import train
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def ablations():
    return load_benchmark("ablations")


def test_groups_share_configs(ablations):
    plain = [group for group in ablations.GROUPS if group != "stability"]
    every = ablations.configs_for(plain, [0, 1])
    text_only = ablations.configs_for(plain, [0, 1], length_inits=("TEXT",))
    # lengths x inits (40) + zero-shot (1) + few-shot 2 x 2 + LoRA 2; inits and the references overlap
    assert len(every) == 40 + 1 + 4 + 2
    # TEXT lengths (10) + the other inits at 20 (6) + baselines (5) + LoRA (2)
    assert len(text_only) == 10 + 6 + 5 + 2
    reference = next(c for c in text_only if c.label() == "prompt_tuning prompt n=20 TEXT seed=0")
    assert set(reference.groups) == {"lengths", "inits", "baselines", "lora"}
    # The stability grid adds the same 20 configs per seed for deep prompts only.
    with_stability = ablations.configs_for(ablations.GROUPS, [0, 1])
    assert len(with_stability) == len(every) + 40
    assert {c.method for c in with_stability if c.kind == "prompt_tuning"} == {"prompt", "prefix"}


def test_settings_added_later_keep_the_keys_of_older_records(ablations):
    config = ablations.Config("prompt_tuning", 0, 20, "TEXT")
    # An older record: fp32, no clipping, no method or dtype in its key.
    legacy = ablations.Settings(budget_steps=60, max_grad_norm=0.0, dtype="float32")
    key = config.key(legacy)
    assert "max_grad_norm" not in key and "dtype" not in key and "prefix" not in key
    # Today's defaults and a deep prompt are other results, with other keys.
    assert config.key(ablations.Settings(budget_steps=60)) != key
    assert dataclasses.replace(config, method="prefix").key(legacy) != key
    older_fields = {k: v for k, v in dataclasses.asdict(legacy).items()
                    if k not in ("max_grad_norm", "dtype")}
    old_record = {**older_fields, "kind": "prompt_tuning", "test_accuracy": 0.8}
    assert ablations.matching([old_record], legacy) == [old_record]
    assert ablations.matching([old_record], ablations.Settings(budget_steps=60)) == []


def test_key_ignores_what_changes_no_result(ablations):
    config = ablations.Config("prompt_tuning", 0, 20, "TEXT")
    settings = ablations.Settings(budget_steps=60)
    same = ablations.Settings(budget_steps=60, device="cuda", length_inits=("TEXT",))
    assert config.key(settings) == config.key(same)
    assert config.key(settings) != config.key(ablations.Settings(budget_steps=61))
    few_shot = ablations.Config("few_shot", 0, shots=4)
    assert few_shot.key(settings) == few_shot.key(ablations.Settings(budget_steps=61, lr=0.1))
    command = ablations.command_line(["lengths"], same, [0, 1])
    assert "--length-inits TEXT" in command and "--budget-steps 60" in command


def test_run_all_resumes_and_skips_configs_recorded_by_another_run(ablations, tmp_path, monkeypatch):
    results = tmp_path / "ablations.jsonl"
    settings = ablations.Settings(budget_steps=3)
    configs = ablations.configs_for(["inits"], [0])
    ran = []

    def fake_run(config, settings, runs_dir):  # the runner's bookkeeping only, no training
        ran.append(config.label())
        if len(ran) == 1:  # meanwhile another process records the last config
            other = configs[-1]
            ablations.append_result(results, {"key": other.key(settings), "kind": other.kind})
        return {"test_accuracy": 0.5, "trainable_parameters": 1, "train_seconds": 0.0}

    monkeypatch.setattr(ablations, "run_config", fake_run)
    assert ablations.run_all(["inits"], settings, [0], results, tmp_path) == len(configs)
    assert ran == [c.label() for c in configs[:-1]]
    keys = [json.loads(line)["key"] for line in results.read_text().splitlines()]
    assert sorted(keys) == sorted(c.key(settings) for c in configs)
    ran.clear()
    assert ablations.run_all(["inits"], settings, [0], results, tmp_path) == 0  # all done
    assert ran == []


def test_lora_baseline_and_prompt_training_share_the_loop(ablations, tiny, tmp_path, monkeypatch):
    """LoRA and prompt tuning both run `train_loop`, on the same batch order for a seed."""
    runs = []
    original = loop_module.train_loop

    def recording_loop(trainable, order, *args, **kwargs):
        batches = []

        def loss_sum(batch):
            batches.append(list(batch))
            return trainable.loss_sum(batch)

        runs.append((order, batches))
        return original(dataclasses.replace(trainable, loss_sum=loss_sum), order, *args, **kwargs)

    monkeypatch.setattr(loop_module, "train_loop", recording_loop)
    monkeypatch.setattr(trainer_module, "train_loop", recording_loop)
    settings = ablations.Settings(
        model=str(tiny.model), dataset=str(tiny.data), budget_steps=3, batch_size=4,
        max_eval_examples=8, device="cpu",
    )
    lora = ablations.run_lora(ablations.Config("lora", seed=1, rank=2), settings)
    # The LoRA baseline's data setting: the dataset's default template and verbalizer.
    train(**tiny.options(tmp_path / "prompt", template=None, verbalizer=None, steps=3,
                         batch_size=4, seed=1, baselines=False, max_eval_examples=8))
    (lora_order, lora_batches), (prompt_order, prompt_batches) = runs
    assert lora_order == prompt_order and lora_order.seed == 1
    assert lora_batches == prompt_batches == lora_order.epoch(0)[:3]
    assert lora_batches != dataclasses.replace(lora_order, seed=0).epoch(0)[:3]  # the seed matters
    assert lora["trainable_parameters"] > 0 and 0.0 <= lora["test_accuracy"] <= 1.0
