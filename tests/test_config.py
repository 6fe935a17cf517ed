"""PromptTuningConfig: PEFT's fields and spellings, validation messages, model-derived fields, JSON."""

from __future__ import annotations

import json

import peft
import pytest

from softprompt.core.config import (
    PEFT_FIELDS,
    InitFill,
    PeftType,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
)
from softprompt.core.prompt import PromptEmbedding
from softprompt.models.tiny import HIDDEN, INIT_TEXT, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

# The PEFT PromptEmbedding docstring example, field by field.
PEFT_EXAMPLE = {
    "peft_type": "PROMPT_TUNING",
    "task_type": "SEQ_2_SEQ_LM",
    "num_virtual_tokens": 20,
    "token_dim": 768,
    "num_transformer_submodules": 1,
    "num_attention_heads": 12,
    "num_layers": 12,
    "prompt_tuning_init": "TEXT",
    "prompt_tuning_init_text": INIT_TEXT,
    "tokenizer_name_or_path": "t5-base",
}


@pytest.fixture
def text_config(tokenizer_dir):
    """``text_config(**overrides)``: a TEXT-init config over the tiny tokenizer."""

    def build(**overrides):
        values = {
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": INIT_TEXT,
            "tokenizer_name_or_path": str(tokenizer_dir),
        }
        return PromptTuningConfig(**{**values, **overrides})

    return build


# ----------------------------------------------------------------------------- accepted values


def test_peft_example_fields_as_strings():
    config = PromptTuningConfig(**PEFT_EXAMPLE)
    assert config.peft_type is PeftType.PROMPT_TUNING
    assert config.task_type is TaskType.SEQ_2_SEQ_LM
    assert config.prompt_tuning_init is PromptTuningInit.TEXT
    assert config.num_virtual_tokens == 20
    assert config.token_dim == 768
    assert config.num_transformer_submodules == 1
    assert config.num_attention_heads == 12
    assert config.num_layers == 12
    assert config.prompt_tuning_init_text == INIT_TEXT
    assert config.tokenizer_name_or_path == "t5-base"
    assert config.total_virtual_tokens == 20


def test_peft_example_fields_as_our_enums_and_peft_enums():
    ours = PromptTuningConfig(
        **{
            **PEFT_EXAMPLE,
            "peft_type": PeftType.PROMPT_TUNING,
            "task_type": TaskType.SEQ_2_SEQ_LM,
            "prompt_tuning_init": PromptTuningInit.TEXT,
        }
    )
    theirs = PromptTuningConfig(
        **{
            **PEFT_EXAMPLE,
            "peft_type": peft.PeftType.PROMPT_TUNING,
            "task_type": peft.TaskType.SEQ_2_SEQ_LM,
            "prompt_tuning_init": peft.PromptTuningInit.TEXT,
        }
    )
    strings = PromptTuningConfig(**PEFT_EXAMPLE)
    assert ours == theirs == strings
    assert theirs.task_type is TaskType.SEQ_2_SEQ_LM  # converted to softprompt's own enum
    assert theirs.prompt_tuning_init is PromptTuningInit.TEXT


def test_choice_fields_are_case_insensitive():
    config = PromptTuningConfig(task_type="seq_cls", prompt_tuning_init="sample_vocab")
    assert config.task_type is TaskType.SEQ_CLS
    assert config.prompt_tuning_init is PromptTuningInit.SAMPLE_VOCAB


def test_other_peft_fields_accepted(text_config):
    config = text_config(
        tokenizer_kwargs={"use_fast": True},
        inference_mode=True,
        base_model_name_or_path="some/model",
        revision="main",
    )
    assert config.tokenizer_kwargs == {"use_fast": True}
    assert config.inference_mode is True
    assert config.base_model_name_or_path == "some/model"
    assert config.revision == "main"


def test_defaults_match_peft():
    ours = PromptTuningConfig()
    theirs = peft.PromptTuningConfig(task_type="CAUSAL_LM")
    assert ours.prompt_tuning_init.value == theirs.prompt_tuning_init.value == "RANDOM"
    assert ours.inference_mode is theirs.inference_mode is False


# ----------------------------------------------------------------------------- errors


def test_text_init_without_text_names_the_field():
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        PromptTuningConfig(prompt_tuning_init="TEXT", tokenizer_name_or_path="tok")
    with pytest.raises(ValueError, match="prompt_tuning_init_text"):
        PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="", tokenizer_name_or_path="tok")


def test_text_init_without_tokenizer_names_the_field():
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT)


@pytest.mark.parametrize("value", [0, -3])
def test_num_virtual_tokens_below_one(value):
    with pytest.raises(ValueError, match=r"num_virtual_tokens must be >= 1"):
        PromptTuningConfig(num_virtual_tokens=value)


@pytest.mark.parametrize("value", [2.5, "20", True, None])
def test_num_virtual_tokens_not_an_integer(value):
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer"):
        PromptTuningConfig(num_virtual_tokens=value)


def test_unknown_task_type_lists_allowed_values():
    with pytest.raises(ValueError) as info:
        PromptTuningConfig(task_type="TRANSLATION")
    message = str(info.value)
    assert "task_type='TRANSLATION'" in message
    for allowed in ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "FEATURE_EXTRACTION"):
        assert allowed in message


def test_unknown_init_lists_allowed_values():
    with pytest.raises(ValueError) as info:
        PromptTuningConfig(prompt_tuning_init="ZEROS")
    message = str(info.value)
    assert "prompt_tuning_init='ZEROS'" in message
    for allowed in ("TEXT", "RANDOM", "SAMPLE_VOCAB", "CLASS_LABEL"):
        assert allowed in message


def test_unknown_fill_and_peft_type_are_rejected():
    with pytest.raises(ValueError, match="prompt_tuning_init_fill='ZERO'.*SAMPLE_VOCAB, REPEAT"):
        PromptTuningConfig(prompt_tuning_init_fill="ZERO")
    with pytest.raises(ValueError, match="peft_type='LORA'.*PROMPT_TUNING"):
        PromptTuningConfig(peft_type="LORA")


@pytest.mark.parametrize("name", ["token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules"])
@pytest.mark.parametrize("value", [0, -1, 2.0, "32", True])
def test_model_fields_must_be_positive_integers(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer or None, got {value!r}"):
        PromptTuningConfig(**{name: value})


def test_num_transformer_submodules_is_one_or_two():
    with pytest.raises(ValueError, match="num_transformer_submodules must be 1 or 2"):
        PromptTuningConfig(num_transformer_submodules=3)


def test_class_label_needs_labels_and_tokenizer():
    with pytest.raises(ValueError, match="prompt_tuning_init_labels"):
        PromptTuningConfig(prompt_tuning_init="CLASS_LABEL", tokenizer_name_or_path="tok")
    with pytest.raises(ValueError, match="prompt_tuning_init_labels"):
        PromptTuningConfig(
            prompt_tuning_init="CLASS_LABEL", prompt_tuning_init_labels=["yes", " "], tokenizer_name_or_path="tok"
        )
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        PromptTuningConfig(prompt_tuning_init="CLASS_LABEL", prompt_tuning_init_labels=["yes", "no"])


def test_tokenizer_kwargs_only_with_a_tokenizer_init():
    # PEFT raises too: the kwargs would silently do nothing.
    with pytest.raises(ValueError, match="tokenizer_kwargs"):
        PromptTuningConfig(prompt_tuning_init="RANDOM", tokenizer_kwargs={"use_fast": True})
    with pytest.raises(ValueError, match="tokenizer_kwargs"):
        peft.PromptTuningConfig(prompt_tuning_init="RANDOM", tokenizer_kwargs={"use_fast": True})


def test_token_dim_mismatch_fill_from_model(llama):
    config = PromptTuningConfig(token_dim=768)
    with pytest.raises(ValueError, match=rf"token_dim=768 .*embedding size is {HIDDEN}"):
        config.fill_from_model(llama)


def test_token_dim_mismatch_prompt_embedding(t5, tokenizer_dir):
    config = PromptTuningConfig(**{**PEFT_EXAMPLE, "tokenizer_name_or_path": str(tokenizer_dir)})
    with pytest.raises(ValueError, match=rf"token_dim=768 .*embedding size is {HIDDEN}"):
        PromptEmbedding(config, t5.shared)


def test_init_text_that_tokenizes_to_nothing(text_config, llama):
    config = text_config(prompt_tuning_init_text="   ", token_dim=HIDDEN)
    with pytest.raises(ValueError, match="prompt_tuning_init_text='   ' tokenizes to no tokens"):
        PromptEmbedding(config, llama.get_input_embeddings())


# ----------------------------------------------------------------------------- from the model


@pytest.mark.parametrize(
    ("builder", "task", "submodules"),
    [
        (tiny_llama, "CAUSAL_LM", 1),
        (tiny_gpt2, "CAUSAL_LM", 1),
        (tiny_t5, "SEQ_2_SEQ_LM", 2),
        (tiny_bert, "SEQ_CLS", 1),
    ],
)
def test_fields_read_from_the_model_as_peft(builder, task, submodules):
    config = PromptTuningConfig(task_type=task, num_virtual_tokens=3).fill_from_model(builder())
    assert (config.token_dim, config.num_layers, config.num_attention_heads) == (HIDDEN, 2, 4)
    assert config.num_transformer_submodules == submodules
    assert config.total_virtual_tokens == 3 * submodules
    # The same values as PEFT's get_peft_model fills in.
    theirs = peft.get_peft_model(builder(), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3))
    filled = theirs.peft_config["default"]
    for name in ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
        assert getattr(config, name) == getattr(filled, name), name


def test_explicit_fields_are_kept_by_fill_from_model(t5):
    config = PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_transformer_submodules=1, num_layers=7, num_attention_heads=5
    ).fill_from_model(t5)
    assert (config.num_transformer_submodules, config.num_layers, config.num_attention_heads) == (1, 7, 5)
    assert config.token_dim == HIDDEN


def test_base_model_name_from_the_model(llama):
    llama.config.name_or_path = "org/tiny-llama"
    assert PromptTuningConfig().fill_from_model(llama).base_model_name_or_path == "org/tiny-llama"
    kept = PromptTuningConfig(base_model_name_or_path="mine").fill_from_model(llama)
    assert kept.base_model_name_or_path == "mine"


# ----------------------------------------------------------------------------- serialisation


def _full_config():
    return PromptTuningConfig(
        task_type="SEQ_CLS",
        num_virtual_tokens=7,
        token_dim=HIDDEN,
        num_transformer_submodules=1,
        num_attention_heads=4,
        num_layers=2,
        prompt_tuning_init="CLASS_LABEL",
        prompt_tuning_init_labels=["very positive", "negative"],
        tokenizer_name_or_path="tok",
        tokenizer_kwargs={"use_fast": True},
        inference_mode=True,
        base_model_name_or_path="org/model",
        revision="v1",
        prompt_tuning_init_fill="REPEAT",
        init_add_special_tokens=True,
        seed=42,
    )


def test_json_round_trip():
    config = _full_config()
    text = json.dumps(config.to_dict())
    values = json.loads(text)
    assert values["task_type"] == "SEQ_CLS" and values["prompt_tuning_init"] == "CLASS_LABEL"
    again = PromptTuningConfig.from_dict(values)
    assert again == config
    assert again.prompt_tuning_init_fill is InitFill.REPEAT


def test_from_json_file_round_trip_and_unknown_keys(tmp_path):
    values = _full_config().to_dict()
    values.update({"peft_version": "9.9.9", "some_future_field": [1, 2]})
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(values))
    assert PromptTuningConfig.from_json_file(path) == _full_config()
    assert PromptTuningConfig.from_dict(values) == _full_config()


def test_from_json_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "adapter_config.json"
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        PromptTuningConfig.from_json_file(missing)
    missing.write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config.json: not valid JSON"):
        PromptTuningConfig.from_json_file(missing)
    missing.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"adapter_config.json: expected a JSON object"):
        PromptTuningConfig.from_json_file(missing)
    missing.write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match=r"adapter_config.json: .*only loads PROMPT_TUNING"):
        PromptTuningConfig.from_json_file(missing)
    missing.write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 0}))
    with pytest.raises(ValueError, match=r"adapter_config.json: num_virtual_tokens must be >= 1"):
        PromptTuningConfig.from_json_file(missing)


def test_to_peft_dict_has_exactly_peft_keys(text_config):
    ours = text_config(num_virtual_tokens=5, tokenizer_kwargs={"use_fast": True}).to_peft_dict()
    theirs = peft.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=5,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path="tok",
        tokenizer_kwargs={"use_fast": True},
    ).to_dict()
    # peft_version is PEFT's stamp of its own library version (filled in by PEFT when absent); a
    # file written by softprompt has no PEFT version to report, so it is the one key left out.
    assert set(theirs) - set(ours) == {"peft_version"}
    assert set(ours) - set(theirs) == set()
    assert list(ours) == [key for key in theirs if key != "peft_version"]  # same order
    assert list(ours) == list(PEFT_FIELDS)
    # Values are plain JSON (no enums) and load back into PEFT's own config class.
    json.dumps(ours)
    loaded = peft.PromptTuningConfig(**ours)
    assert loaded.prompt_tuning_init == "TEXT" and loaded.tokenizer_kwargs == {"use_fast": True}
    assert loaded.num_virtual_tokens == 5


def test_to_peft_dict_maps_softprompt_only_inits_for_peft():
    config = _full_config()  # CLASS_LABEL, which PEFT does not know
    values = config.to_peft_dict()
    assert values["prompt_tuning_init"] == "RANDOM"
    assert values["tokenizer_name_or_path"] is None and values["tokenizer_kwargs"] is None
    peft.PromptTuningConfig(**values)  # PEFT accepts it
    extra = config.softprompt_fields()
    assert extra["prompt_tuning_init"] == "CLASS_LABEL"
    assert extra["prompt_tuning_init_labels"] == ["very positive", "negative"]
    assert PromptTuningConfig.from_dict(values, extra).prompt_tuning_init is PromptTuningInit.CLASS_LABEL


def test_peft_written_config_dict_loads():
    theirs = peft.PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, token_dim=HIDDEN, num_transformer_submodules=2
    ).to_dict()
    theirs = json.loads(json.dumps(theirs, default=lambda value: value.value))
    config = PromptTuningConfig.from_dict(theirs)
    assert config.task_type is TaskType.SEQ_2_SEQ_LM
    assert config.total_virtual_tokens == 8
