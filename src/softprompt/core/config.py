"""`PromptTuningConfig` and `PrefixTuningConfig`: PEFT's configs, validated, with JSON round-trip.

The field names and the on-disk ``adapter_config.json`` shape follow Hugging Face PEFT so that
checkpoints move both ways. Fields PEFT does not know (``prompt_tuning_init_fill``,
``prompt_tuning_init_labels``, ``seed``) live in softprompt's own metadata file instead.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADAPTER_CONFIG_NAME = "adapter_config.json"


class _ChoiceEnum(str, enum.Enum):
    """A str-Enum whose `parse` error names the field and lists the allowed values."""

    @classmethod
    def parse(cls, value: Any, field_name: str) -> _ChoiceEnum:
        if isinstance(value, cls):
            return value
        text = getattr(value, "value", value)
        if isinstance(text, str):
            for member in cls:
                if text.upper() == member.value:
                    return member
        allowed = ", ".join(member.value for member in cls)
        raise ValueError(f"{field_name}={value!r} is not valid; allowed values: {allowed}")


class PeftType(_ChoiceEnum):
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"


class TaskType(_ChoiceEnum):
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    SEQ_CLS = "SEQ_CLS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PromptTuningInit(_ChoiceEnum):
    TEXT = "TEXT"
    RANDOM = "RANDOM"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    CLASS_LABEL = "CLASS_LABEL"


class InitFill(_ChoiceEnum):
    """How TEXT init fills the virtual tokens its text does not cover."""

    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    REPEAT = "REPEAT"


# Fields PEFT 0.21 writes for every prompt-learning adapter, in its order, except
# ``peft_version``: that is PEFT's stamp of its own library version (filled in when absent).
_PROMPT_LEARNING_FIELDS = (
    "task_type",
    "peft_type",
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "modules_to_save",
)
# ... then a prompt-tuning adapter's own fields.
PEFT_FIELDS = (
    *_PROMPT_LEARNING_FIELDS,
    "prompt_tuning_init",
    "prompt_tuning_init_text",
    "tokenizer_name_or_path",
    "tokenizer_kwargs",
)
# Init values PEFT understands; others are stored as RANDOM for PEFT (the weights are saved anyway).
_PEFT_INITS = {PromptTuningInit.TEXT, PromptTuningInit.RANDOM, PromptTuningInit.SAMPLE_VOCAB}


@dataclass
class PromptTuningConfig:
    """Configuration of a soft prompt (Lester et al., 2021), named as in PEFT.

    Strings or enums are accepted for every choice field. Fields readable from a model
    (``token_dim``, ``num_layers``, ``num_attention_heads``, ``num_transformer_submodules``)
    may be left ``None`` and are filled by :meth:`fill_from_model`.
    """

    task_type: TaskType | str = field(
        default=TaskType.CAUSAL_LM, metadata={"help": "CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS or FEATURE_EXTRACTION"}
    )
    peft_type: PeftType | str = field(default=PeftType.PROMPT_TUNING, metadata={"help": "Always PROMPT_TUNING"})
    num_virtual_tokens: int = field(default=20, metadata={"help": "Virtual tokens per transformer submodule"})
    token_dim: int | None = field(default=None, metadata={"help": "Hidden size of the base model's embeddings"})
    num_transformer_submodules: int | None = field(
        default=None, metadata={"help": "1 for decoder-only/encoder; 2 gives seq2seq decoders a prompt too"}
    )
    num_attention_heads: int | None = field(default=None, metadata={"help": "Read from the model if omitted"})
    num_layers: int | None = field(default=None, metadata={"help": "Read from the model if omitted"})
    prompt_tuning_init: PromptTuningInit | str = field(
        default=PromptTuningInit.RANDOM, metadata={"help": "TEXT, RANDOM, SAMPLE_VOCAB or CLASS_LABEL"}
    )
    prompt_tuning_init_text: str | None = field(default=None, metadata={"help": "Instruction for TEXT init"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer for TEXT/CLASS_LABEL init"})
    tokenizer_kwargs: dict | None = field(default=None, metadata={"help": "Extra AutoTokenizer.from_pretrained kwargs"})
    inference_mode: bool = field(default=False, metadata={"help": "True freezes the prompt too"})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Base model the prompt was tuned on"})
    revision: str | None = field(default=None, metadata={"help": "Base model revision"})
    prompt_tuning_init_fill: InitFill | str = field(
        default=InitFill.SAMPLE_VOCAB,
        metadata={"help": "TEXT init: fill uncovered tokens by SAMPLE_VOCAB (paper) or REPEAT (PEFT)"},
    )
    prompt_tuning_init_labels: list[str] | None = field(
        default=None, metadata={"help": "Label words for CLASS_LABEL init"}
    )
    init_add_special_tokens: bool = field(
        default=False, metadata={"help": "TEXT init: keep the tokenizer's special tokens (PEFT keeps them)"}
    )
    seed: int = field(default=0, metadata={"help": "Seed for the random parts of the init"})

    def __post_init__(self) -> None:
        self.task_type = TaskType.parse(self.task_type, "task_type")
        self.peft_type = PeftType.parse(self.peft_type, "peft_type")
        if self.peft_type != PeftType.PROMPT_TUNING:
            raise ValueError(f"peft_type={self.peft_type.value!r}: a PromptTuningConfig is PROMPT_TUNING")
        self.prompt_tuning_init = PromptTuningInit.parse(self.prompt_tuning_init, "prompt_tuning_init")
        self.prompt_tuning_init_fill = InitFill.parse(self.prompt_tuning_init_fill, "prompt_tuning_init_fill")
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int):
            raise ValueError(f"num_virtual_tokens must be an integer >= 1, got {self.num_virtual_tokens!r}")
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(f"num_transformer_submodules must be 1 or 2, got {self.num_transformer_submodules}")
        init = self.prompt_tuning_init
        if init == PromptTuningInit.TEXT:
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text (the instruction)")
            if not self.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path")
        if init == PromptTuningInit.CLASS_LABEL:
            labels = self.prompt_tuning_init_labels
            if not labels or not all(isinstance(word, str) and word.strip() for word in labels):
                raise ValueError(
                    "prompt_tuning_init='CLASS_LABEL' needs prompt_tuning_init_labels, a list of non-empty label words"
                )
            if not self.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init='CLASS_LABEL' needs tokenizer_name_or_path")
        if self.tokenizer_kwargs and init not in (PromptTuningInit.TEXT, PromptTuningInit.CLASS_LABEL):
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init TEXT or CLASS_LABEL")

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the prompt matrix: ``num_virtual_tokens * num_transformer_submodules``."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    @property
    def weights_shape(self) -> tuple[int, int]:
        """Shape of the saved ``prompt_embeddings``: ``(total_virtual_tokens, token_dim)``."""
        return (self.total_virtual_tokens, self.token_dim)

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def fill_from_model(self, model: Any) -> PromptTuningConfig:
        """Fill the model-derived fields left ``None`` and check ``token_dim`` against the model.

        Args:
            model: a transformers ``PreTrainedModel``.

        Returns:
            self, for chaining.

        Raises:
            ValueError: ``token_dim`` differs from the model's embedding size.
        """
        embedding_dim = model.get_input_embeddings().weight.shape[1]
        if self.token_dim is None:
            self.token_dim = embedding_dim
        check_prompt_width(self.token_dim, embedding_dim, f"token_dim={self.token_dim} in the config")
        model_config = model.config
        text_config = getattr(model_config, "get_text_config", lambda: model_config)()
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 2 if self.task_type == TaskType.SEQ_2_SEQ_LM else 1
        if self.num_layers is None:
            self.num_layers = _first_attribute(text_config, ("num_hidden_layers", "num_layers", "n_layer"))
        if self.num_attention_heads is None:
            self.num_attention_heads = _first_attribute(
                text_config, ("num_attention_heads", "num_heads", "n_head")
            )
        if self.base_model_name_or_path is None:
            self.base_model_name_or_path = getattr(model_config, "name_or_path", None) or None
        return self

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content, with PEFT's keys only and enums as strings."""
        init = self.prompt_tuning_init
        values = {
            "task_type": self.task_type.value,
            "peft_type": self.peft_type.value,
            "auto_mapping": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": self.revision,
            "inference_mode": self.inference_mode,
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": self.token_dim,
            "num_transformer_submodules": self.num_transformer_submodules,
            "num_attention_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "modules_to_save": None,
            "prompt_tuning_init": init.value if init in _PEFT_INITS else PromptTuningInit.RANDOM.value,
            "prompt_tuning_init_text": self.prompt_tuning_init_text if init == PromptTuningInit.TEXT else None,
            "tokenizer_name_or_path": self.tokenizer_name_or_path if init == PromptTuningInit.TEXT else None,
            "tokenizer_kwargs": self.tokenizer_kwargs if init == PromptTuningInit.TEXT else None,
        }
        return {key: values[key] for key in PEFT_FIELDS}

    def softprompt_fields(self) -> dict[str, Any]:
        """The fields PEFT does not store; kept in ``softprompt.json`` beside the checkpoint."""
        return {
            "prompt_tuning_init": self.prompt_tuning_init.value,
            "prompt_tuning_init_fill": self.prompt_tuning_init_fill.value,
            "prompt_tuning_init_labels": self.prompt_tuning_init_labels,
            "prompt_tuning_init_text": self.prompt_tuning_init_text,
            "tokenizer_name_or_path": self.tokenizer_name_or_path,
            "init_add_special_tokens": self.init_add_special_tokens,
            "seed": self.seed,
        }

    def to_dict(self) -> dict[str, Any]:
        """Every field, enums as strings (JSON-ready)."""
        return {
            item.name: getattr(getattr(self, item.name), "value", getattr(self, item.name))
            for item in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any], extra: dict[str, Any] | None = None) -> PromptTuningConfig:
        """Build from a dict, ignoring unknown keys (newer PEFT files still load).

        Args:
            values: e.g. the parsed ``adapter_config.json``.
            extra: softprompt's own fields (from ``softprompt.json``), applied on top.
        """
        if values.get("peft_type", "PROMPT_TUNING") != "PROMPT_TUNING":
            raise ValueError(
                f"peft_type={values.get('peft_type')!r}: softprompt only loads PROMPT_TUNING adapters"
            )
        known = {item.name for item in dataclasses.fields(cls)}
        merged = {key: value for key, value in values.items() if key in known}
        merged.update({key: value for key, value in (extra or {}).items() if key in known})
        return cls(**merged)

    @classmethod
    def from_json_file(cls, path: str | Path) -> PromptTuningConfig:
        """Read an ``adapter_config.json`` (PEFT's or ours), with errors that name the file."""
        path = Path(path)
        values = _read_json_object(path)
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None


# Fields PEFT 0.21 writes for a prefix-tuning adapter (except ``peft_version``), in its order.
PREFIX_PEFT_FIELDS = (
    *_PROMPT_LEARNING_FIELDS,
    "init_weights",
    "encoder_hidden_size",
    "prefix_projection",
)


@dataclass
class PrefixTuningConfig:
    """Configuration of a deep prompt (prefix tuning, Li & Liang 2021), named as in PEFT.

    A prefix is keys and values at every layer: ``num_virtual_tokens`` rows of
    ``num_layers * 2 * token_dim`` numbers. As in PEFT, ``token_dim`` is the width of one layer's
    keys (``num_attention_heads * head_dim``) and, for grouped-query attention,
    ``num_attention_heads`` is the number of key/value heads (PEFT issue #1901), so
    ``token_dim`` is smaller than the hidden size. Fields left ``None`` are filled by
    :meth:`fill_from_model`. How the prefix was initialised is softprompt metadata
    (``softprompt.json``), not a field: the saved prefix is all PEFT needs.
    """

    task_type: TaskType | str = field(default=TaskType.CAUSAL_LM, metadata={"help": "Only CAUSAL_LM is served"})
    peft_type: PeftType | str = field(default=PeftType.PREFIX_TUNING, metadata={"help": "Always PREFIX_TUNING"})
    num_virtual_tokens: int = field(default=20, metadata={"help": "Prefix positions at every layer"})
    token_dim: int | None = field(default=None, metadata={"help": "key/value heads x head_dim"})
    num_transformer_submodules: int | None = field(default=None, metadata={"help": "1 for decoder-only models"})
    num_attention_heads: int | None = field(default=None, metadata={"help": "key/value heads (GQA)"})
    num_layers: int | None = field(default=None, metadata={"help": "Layers of the base model"})
    encoder_hidden_size: int | None = field(default=None, metadata={"help": "Hidden size of the MLP"})
    prefix_projection: bool = field(default=False, metadata={"help": "Train through an MLP (folded on save)"})
    init_weights: str | None = field(default=None, metadata={"help": "PEFT's init of its own encoder"})
    inference_mode: bool = field(default=False, metadata={"help": "True freezes the prefix"})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Base model"})
    revision: str | None = field(default=None, metadata={"help": "Base model revision"})

    def __post_init__(self) -> None:
        self.task_type = TaskType.parse(self.task_type, "task_type")
        self.peft_type = PeftType.parse(self.peft_type, "peft_type")
        if self.peft_type != PeftType.PREFIX_TUNING:
            raise ValueError(f"peft_type={self.peft_type.value!r}: a PrefixTuningConfig is PREFIX_TUNING")
        for name in ("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                     "num_layers", "encoder_hidden_size"):
            value = getattr(self, name)
            optional = name != "num_virtual_tokens"
            if (value is None and not optional) or (
                value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1)
            ):
                raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError("num_transformer_submodules must be 1: softprompt serves decoder-only prefixes")
        heads = self.num_attention_heads
        if self.token_dim is not None and heads is not None and self.token_dim % heads:
            raise ValueError(f"token_dim={self.token_dim} is not a multiple of num_attention_heads={heads}")

    @property
    def head_dim(self) -> int:
        return self.token_dim // self.num_attention_heads

    @property
    def total_virtual_tokens(self) -> int:
        return self.num_virtual_tokens

    @property
    def weights_shape(self) -> tuple[int, int]:
        """Shape of the saved ``prompt_embeddings``: ``(num_virtual_tokens, num_layers * 2 * token_dim)``."""
        return (self.num_virtual_tokens, self.num_layers * 2 * self.token_dim)

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def fill_from_model(self, model: Any) -> PrefixTuningConfig:
        """Fill the fields left ``None`` from the model's config, as PEFT does (key/value heads for GQA).

        Args:
            model: a transformers ``PreTrainedModel``.

        Returns:
            self, for chaining.
        """
        text_config = getattr(model.config, "get_text_config", lambda: model.config)()
        heads = _first_attribute(text_config, ("num_attention_heads", "num_heads", "n_head"))
        kv_heads = _first_attribute(text_config, ("num_key_value_heads",)) or heads
        hidden = _first_attribute(text_config, ("hidden_size", "n_embd", "d_model"))
        head_dim = _first_attribute(text_config, ("head_dim",)) or hidden // heads
        if self.num_layers is None:
            self.num_layers = _first_attribute(text_config, ("num_hidden_layers", "num_layers", "n_layer"))
        if self.num_attention_heads is None:
            self.num_attention_heads = kv_heads
        if self.token_dim is None:
            self.token_dim = self.num_attention_heads * head_dim
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 1
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim
        if self.base_model_name_or_path is None:
            self.base_model_name_or_path = getattr(model.config, "name_or_path", None) or None
        return self

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content, with PEFT's keys only."""
        values = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        values.update(task_type=self.task_type.value, peft_type=self.peft_type.value, auto_mapping=None,
                      modules_to_save=None)
        return {key: values[key] for key in PREFIX_PEFT_FIELDS}

    def softprompt_fields(self) -> dict[str, Any]:
        """Nothing beyond PEFT's fields (the init recipe is metadata of its own)."""
        return {}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PrefixTuningConfig:
        """Build from a dict, ignoring unknown keys (newer PEFT files still load)."""
        known = {item.name for item in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})


AdapterConfig = PromptTuningConfig | PrefixTuningConfig


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """Read an ``adapter_config.json``: a prompt (PROMPT_TUNING) or a prefix (PREFIX_TUNING).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: not JSON, another PEFT method, or invalid fields (the message names the file).
    """
    path = Path(path)
    values = _read_json_object(path)
    kind = values.get("peft_type", "PROMPT_TUNING")
    if kind not in (PeftType.PROMPT_TUNING.value, PeftType.PREFIX_TUNING.value):
        raise ValueError(
            f"{path}: peft_type={kind!r}: softprompt loads PROMPT_TUNING and PREFIX_TUNING adapters"
        )
    config_class = PrefixTuningConfig if kind == PeftType.PREFIX_TUNING.value else PromptTuningConfig
    try:
        return config_class.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; errors name the file."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (expected a PEFT adapter_config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return values


def _first_attribute(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_prompt_width(width: int, embedding_size: int, source: str, base_model: str | None = None) -> None:
    """Refuse a prompt whose width is not the model's embedding size.

    Args:
        width: the prompt's last dimension.
        embedding_size: the model's hidden size.
        source: what the prompt came from (a checkpoint directory), named in the error.
        base_model: the model the prompt was tuned for, if known, named in the error.

    Raises:
        ValueError: the widths differ.
    """
    if width != embedding_size:
        tuned_for = f"; it was tuned for another model ({base_model})" if base_model else ""
        raise ValueError(
            f"{source}: the prompt has width {width} but the model's embedding size is "
            f"{embedding_size}{tuned_for}"
        )
