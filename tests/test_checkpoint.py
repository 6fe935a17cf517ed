"""Checkpoints: PEFT's on-disk format both ways, clear errors, trainable flag, atomic saves."""

from __future__ import annotations

import json
import os
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import softprompt.core.checkpoint as checkpoint_module
from softprompt.core.checkpoint import load_prompt, save_prompt
from softprompt.core.config import PEFT_FIELDS, PromptTuningConfig, PromptTuningInit
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.data import pad_batch
from softprompt.models.tiny import (
    HIDDEN,
    PAD_ID,
    random_ids,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)

N = 4
FILES = {"adapter_config.json", "adapter_model.safetensors", "softprompt.json"}


def _inputs():
    rows = [random_ids(1, 6, seed=1)[0].tolist(), random_ids(1, 3, seed=2)[0].tolist()]
    ids, mask = pad_batch(rows, PAD_ID)
    return {"input_ids": ids, "attention_mask": mask}


def _seq2seq_inputs():
    return {**_inputs(), "decoder_input_ids": torch.tensor([[0, 7, 8], [0, 9, 10]])}


CASES = [
    pytest.param(tiny_llama, "CAUSAL_LM", _inputs, 1, id="llama"),
    pytest.param(tiny_t5, "SEQ_2_SEQ_LM", _seq2seq_inputs, 2, id="t5"),
    pytest.param(tiny_bert, "SEQ_CLS", _inputs, 1, id="bert"),
]


def _ours(builder, task, seed=5):
    return PromptTunedModel(builder(), PromptTuningConfig(task_type=task, num_virtual_tokens=N, seed=seed))


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _snapshot(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize(("builder", "task", "inputs", "submodules"), CASES)
def test_checkpoint_layout(tmp_path, builder, task, inputs, submodules):
    model = _ours(builder, task)
    target = tmp_path / "prompt"
    assert model.save_pretrained(target, metadata={"note": "hello"}) == target
    assert {path.name for path in target.iterdir()} == FILES
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prompt"]  # no temp or backup left
    tensors = load_file(str(target / "adapter_model.safetensors"))
    if task == "SEQ_CLS":  # PEFT cannot load a SEQ_CLS checkpoint without the (frozen) head
        assert sorted(tensors) == ["base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"]
        assert torch.equal(tensors["base_model.classifier.weight"], model.base_model.classifier.weight)
    else:
        assert list(tensors) == ["prompt_embeddings"]
    assert tensors["prompt_embeddings"].shape == (N * submodules, HIDDEN)
    assert tensors["prompt_embeddings"].dtype == torch.float32
    assert torch.equal(tensors["prompt_embeddings"], model.get_prompt_embedding_to_save())
    adapter_config = json.loads((target / "adapter_config.json").read_text())
    assert list(adapter_config) == list(PEFT_FIELDS)
    assert adapter_config["peft_type"] == "PROMPT_TUNING" and adapter_config["task_type"] == task
    assert adapter_config["inference_mode"] is True
    assert adapter_config["num_transformer_submodules"] == submodules
    assert adapter_config["token_dim"] == HIDDEN
    meta = json.loads((target / "softprompt.json").read_text())
    assert meta["note"] == "hello"
    assert meta["config"]["seed"] == 5
    assert meta["init_report"]["strategy"] == "RANDOM"


def test_checkpoint_has_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        _ours(tiny_llama, "CAUSAL_LM").save_pretrained(tmp_path / "prompt")
    finally:
        os.umask(previous)
    assert (tmp_path / "prompt").stat().st_mode & 0o777 == 0o755
    # (safetensors itself writes the weights file 0600, with PEFT as with softprompt.)
    for name in ("adapter_config.json", "softprompt.json"):
        assert (tmp_path / "prompt" / name).stat().st_mode & 0o777 == 0o644


def test_saving_again_keeps_other_files(tmp_path):
    target = tmp_path / "best"
    model = _ours(tiny_llama, "CAUSAL_LM")
    model.save_pretrained(target)
    # A tokenizer, a README and a sub-folder saved beside the prompt (a usual layout).
    (target / "tokenizer.json").write_text('{"version": "1.0"}')
    (target / "README.md").write_text("my prompt")
    (target / "logs").mkdir()
    (target / "logs" / "train.log").write_text("step 1")
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.mul_(2.0)
    model.save_pretrained(target)
    assert (target / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (target / "README.md").read_text() == "my prompt"
    assert (target / "logs" / "train.log").read_text() == "step 1"
    assert torch.equal(load_prompt(target).weights, model.get_prompt_embedding_to_save())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best"]


# ----------------------------------------------------------------------------- interchange


@pytest.mark.parametrize(("builder", "task", "inputs", "submodules"), CASES)
def test_saved_by_softprompt_loaded_by_peft(tmp_path, builder, task, inputs, submodules):
    ours = _ours(builder, task)
    ours.save_pretrained(tmp_path / "prompt")
    theirs = peft.PeftModel.from_pretrained(builder(), str(tmp_path / "prompt"))
    assert theirs.peft_config["default"].num_transformer_submodules == submodules
    assert torch.equal(theirs.prompt_encoder.default.embedding.weight.detach(), ours.get_prompt_embedding_to_save())
    assert torch.equal(_logits(theirs, inputs()), _logits(ours, inputs()))


@pytest.mark.parametrize(("builder", "task", "inputs", "submodules"), CASES)
def test_saved_by_peft_loaded_by_softprompt(tmp_path, builder, task, inputs, submodules):
    torch.manual_seed(3)
    theirs = peft.get_peft_model(builder(), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N))
    theirs.eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = PromptTunedModel.from_pretrained(builder(), tmp_path / "peft")
    assert ours.peft_config.num_transformer_submodules == submodules
    assert torch.equal(ours.get_prompt_embedding_to_save(), theirs.get_prompt_embedding_to_save("default"))
    assert torch.equal(_logits(ours, inputs()), _logits(theirs, inputs()))


def test_peft_text_init_checkpoint_loads_without_the_tokenizer(tmp_path, tokenizer_dir):
    tokenizer_copy = shutil.copytree(tokenizer_dir, tmp_path / "tok")
    config = peft.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=N,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="positive or negative",
        tokenizer_name_or_path=str(tokenizer_copy),
    )
    theirs = peft.get_peft_model(tiny_llama(), config)
    theirs.save_pretrained(str(tmp_path / "peft"))
    shutil.rmtree(tokenizer_copy)  # the weights are saved: no init, so no tokenizer is needed
    ours = PromptTunedModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert ours.peft_config.prompt_tuning_init is PromptTuningInit.TEXT
    assert ours.peft_config.tokenizer_name_or_path == str(tokenizer_copy)
    assert torch.equal(ours.get_prompt_embedding_to_save(), theirs.get_prompt_embedding_to_save("default"))


def test_peft_sequence_classification_checkpoint(tmp_path, bert):
    inputs = _inputs()
    theirs = peft.get_peft_model(tiny_bert(), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N))
    theirs.eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    # PEFT saves the classification head too (modules_to_save); untouched, it is the model's own.
    assert "base_model.classifier.weight" in load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = PromptTunedModel.from_pretrained(tiny_bert(), tmp_path / "peft")
    assert torch.equal(_logits(ours, inputs), _logits(theirs, inputs))
    # A head trained with the prompt cannot be carried by softprompt: a clear error, not wrong logits.
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(1.0)
    theirs.save_pretrained(str(tmp_path / "peft"))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: besides the prompt it holds base_model"):
        PromptTunedModel.from_pretrained(tiny_bert(), tmp_path / "peft")
    # With the trained head copied into the model, the logits are PEFT's.
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    with torch.no_grad():
        bert.classifier.weight.copy_(saved["base_model.classifier.weight"])
        bert.classifier.bias.copy_(saved["base_model.classifier.bias"])
    ours = PromptTunedModel.from_pretrained(bert, tmp_path / "peft")
    assert torch.equal(_logits(ours, inputs), _logits(theirs, inputs))


def test_sequence_classification_head_keys_match_peft(tmp_path):
    from transformers import LlamaForSequenceClassification

    def llama_classifier():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(tiny_llama().config).eval()

    theirs = peft.get_peft_model(llama_classifier(), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N))
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = PromptTunedModel(llama_classifier(), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N))
    ours.save_pretrained(tmp_path / "ours")
    peft_tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    our_tensors = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(our_tensors) == sorted(peft_tensors) == ["base_model.score.weight", "prompt_embeddings"]
    assert torch.equal(our_tensors["base_model.score.weight"], peft_tensors["base_model.score.weight"])


def test_sequence_classification_prompt_needs_its_head(tmp_path):
    _ours(tiny_bert, "SEQ_CLS").save_pretrained(tmp_path / "prompt")
    with pytest.raises(ValueError, match=r"holds base_model.classifier.weight \(PEFT.s modules_to_save.*differ from the model"):
        PromptTunedModel.from_pretrained(tiny_bert(seed=1), tmp_path / "prompt")  # another random head


def test_softprompt_round_trip_keeps_softprompt_fields(tmp_path, tokenizer_dir):
    config = PromptTuningConfig(
        num_virtual_tokens=N,
        prompt_tuning_init="CLASS_LABEL",
        prompt_tuning_init_labels=["very positive", "negative"],
        tokenizer_name_or_path=str(tokenizer_dir),
        seed=9,
    )
    model = PromptTunedModel(tiny_llama(), config)
    model.save_pretrained(tmp_path / "prompt")
    # PEFT sees a RANDOM init (it does not know CLASS_LABEL); softprompt gets it back.
    assert json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())["prompt_tuning_init"] == "RANDOM"
    loaded = load_prompt(tmp_path / "prompt")
    assert loaded.config.prompt_tuning_init is PromptTuningInit.CLASS_LABEL
    assert loaded.config.prompt_tuning_init_labels == ["very positive", "negative"]
    assert loaded.config.seed == 9
    assert torch.equal(loaded.weights, model.get_prompt_embedding_to_save())
    again = PromptTunedModel.from_pretrained(tiny_llama(), tmp_path / "prompt")
    assert again.metadata["init_report"]["strategy"] == "CLASS_LABEL"
    assert torch.equal(_logits(again, _inputs()), _logits(model, _inputs()))


# ----------------------------------------------------------------------------- trainable flag


def test_is_trainable(tmp_path, gpt2):
    _ours(tiny_gpt2, "CAUSAL_LM").save_pretrained(tmp_path / "prompt")
    frozen = PromptTunedModel.from_pretrained(gpt2.train(), tmp_path / "prompt")
    assert not any(parameter.requires_grad for parameter in frozen.parameters())
    assert frozen.peft_config.inference_mode is True
    # Loaded for inference: eval mode, so GPT-2's dropout is off and outputs are repeatable.
    assert not frozen.training and not frozen.base_model.training
    assert torch.equal(_logits(frozen, _inputs()), _logits(frozen, _inputs()))
    trainable = PromptTunedModel.from_pretrained(tiny_gpt2(), tmp_path / "prompt", is_trainable=True)
    names = [name for name, parameter in trainable.named_parameters() if parameter.requires_grad]
    assert names == ["prompt_encoder.embedding.weight"]
    assert trainable.peft_config.inference_mode is False
    loss = trainable(**_inputs(), labels=_inputs()["input_ids"]).loss
    loss.backward()
    assert trainable.prompt_encoder.embedding.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- errors


def test_other_embedding_size_fails_clearly(tmp_path):
    _ours(tiny_llama, "CAUSAL_LM").save_pretrained(tmp_path / "prompt")
    with pytest.raises(ValueError, match=r"prompt has width 32 but the model's embedding size is 48"):
        PromptTunedModel.from_pretrained(tiny_llama(hidden_size=48), tmp_path / "prompt")


@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "prompt"
    _ours(tiny_llama, "CAUSAL_LM").save_pretrained(directory)
    return directory


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: prompt checkpoint directory does not exist"):
        load_prompt(tmp_path / "nowhere")


def test_missing_weights_file(saved):
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model.safetensors: missing; not a prompt checkpoint"):
        load_prompt(saved)


def test_missing_adapter_config(saved):
    (saved / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json: no such file"):
        PromptTunedModel.from_pretrained(tiny_llama(), saved)


def test_bin_only_is_refused(saved):
    (saved / "adapter_model.safetensors").unlink()
    torch.save({"prompt_embeddings": torch.zeros(N, HIDDEN)}, saved / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"only adapter_model.bin .*safetensors only"):
        load_prompt(saved)


def test_safetensors_without_the_key(saved):
    save_file({"base_model.lora_A.weight": torch.zeros(2, 2)}, str(saved / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: no 'prompt_embeddings' tensor .*lora_A"):
        load_prompt(saved)


def test_unreadable_safetensors(saved):
    (saved / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: not a readable safetensors file"):
        load_prompt(saved)


def test_invalid_json_names_the_file(saved):
    (saved / "adapter_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"adapter_config.json: not valid JSON"):
        load_prompt(saved)


def test_invalid_metadata_json_names_the_file(saved):
    (saved / "softprompt.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"softprompt.json: not valid JSON"):
        load_prompt(saved)


def test_not_a_prompt_tuning_adapter(saved):
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match=r"adapter_config.json: .*loads PROMPT_TUNING and PREFIX_TUNING"):
        load_prompt(saved)


def test_rows_disagree_with_config(saved):
    save_file({"prompt_embeddings": torch.zeros(N + 1, HIDDEN)}, str(saved / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"5 prompt rows, but adapter_config.json says num_virtual_tokens=4"):
        load_prompt(saved)


def test_save_checks_the_shape(tmp_path):
    config = PromptTuningConfig(num_virtual_tokens=N, token_dim=HIDDEN, num_transformer_submodules=1)
    with pytest.raises(ValueError, match=r"prompt weights have shape \(3, 32\), config expects \(4, 32\)"):
        save_prompt(tmp_path / "prompt", torch.zeros(3, HIDDEN), config)
    assert not (tmp_path / "prompt").exists()


# ----------------------------------------------------------------------------- atomic save


def test_save_onto_a_file_is_refused_and_keeps_the_file(tmp_path, capsys):
    from softprompt.cli import main

    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    with pytest.raises(ValueError, match="notes.txt: is a file, not a checkpoint directory"):
        _ours(tiny_llama, "CAUSAL_LM").save_pretrained(target)
    _ours(tiny_llama, "CAUSAL_LM").save_pretrained(tmp_path / "prompt")
    soup = ["soup", str(tmp_path / "prompt"), str(tmp_path / "prompt"), "--output", str(target)]
    assert main(soup) == 2
    assert "is a file, not a checkpoint directory" in capsys.readouterr().err
    assert target.read_text() == "keep me\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt", "prompt"]


def test_failing_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = _ours(tiny_llama, "CAUSAL_LM")
    target = tmp_path / "prompt"
    model.save_pretrained(target)
    before = _snapshot(target)
    old_weights = model.get_prompt_embedding_to_save()
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.add_(1.0)

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:  # half a file, then the crash
            handle.write(b"\x00" * 16)
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", broken_save_file)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(target)
    assert _snapshot(target) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prompt"]
    assert torch.equal(load_prompt(target).weights, old_weights)
    monkeypatch.undo()
    model.save_pretrained(target)
    assert torch.equal(load_prompt(target).weights, old_weights + 1.0)


def test_crash_between_renames_keeps_a_loadable_checkpoint(tmp_path, monkeypatch):
    model = _ours(tiny_llama, "CAUSAL_LM")
    target = tmp_path / "prompt"
    model.save_pretrained(target)
    old_weights = model.get_prompt_embedding_to_save()
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.add_(1.0)
    real_replace = os.replace

    def replace_failing_on_staging(source, destination):
        if str(os.fspath(source)).endswith(".tmp") and os.path.isdir(source):
            raise OSError("power cut")
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_failing_on_staging)
    for _ in range(2):  # the second interrupted save must not destroy the only good copy either
        with pytest.raises(OSError, match="power cut"):
            model.save_pretrained(target)
        assert not target.exists()
        assert torch.equal(load_prompt(target).weights, old_weights)  # read from prompt.previous
    monkeypatch.undo()
    model.save_pretrained(target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["prompt"]
    assert torch.equal(load_prompt(target).weights, old_weights + 1.0)
