"""Verbalizers: the word(s) the model should produce for each class label.

A `Verbalizer` maps label -> word, or label -> several words (the first is the primary word,
used as the training target; the others are alternatives a scorer may pool).

Leading-space policy: the word follows the template directly (``"...Sentiment:" + " positive"``),
and BPE tokenizers (GPT-2, Llama 3, SmolLM) encode ``" positive"`` and ``"positive"`` as different
tokens, so words should normally start with a space.

* `Verbalizer(...)` and JSON given to `parse_verbalizer` keep words exactly as written.
* The ``label=word`` form of `parse_verbalizer` prepends a space to each word that lacks one.
* `Verbalizer.default_for` maps each label to ``" " + label``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizedVerbalizer:
    """Verbalizer words as token ids for one tokenizer.

    Attributes:
        labels: Labels in verbalizer order; index i is class i.
        label_token_ids: Per label, the primary word's token ids (no special tokens).
        variant_token_ids: Per label, the token ids of every word (primary first).
    """

    labels: list[str]
    label_token_ids: list[list[int]]
    variant_token_ids: list[list[list[int]]]

    def __post_init__(self) -> None:
        if not (len(self.labels) == len(self.label_token_ids) == len(self.variant_token_ids)):
            raise ValueError(
                "TokenizedVerbalizer: labels, label_token_ids and variant_token_ids "
                "must have the same length"
            )

    @property
    def is_single_token(self) -> bool:
        """bool: Every word of every label is exactly one token."""
        return all(len(ids) == 1 for variants in self.variant_token_ids for ids in variants)

    @property
    def first_token_ids(self) -> list[int]:
        """list[int]: The first token of each label's primary word, shape (num_labels,)."""
        return [ids[0] for ids in self.label_token_ids]

    @property
    def continuation_room(self) -> int:
        """int: Positions the label continuations take after a text (multi-token words: the
        longest word's tokens but its last; single-token words: none)."""
        if self.is_single_token:
            return 0
        return max(len(ids) for ids in self.label_token_ids) - 1

    def index(self, label: str) -> int:
        """Returns the class index of ``label``."""
        try:
            return self.labels.index(label)
        except ValueError:
            raise ValueError(
                f"label {label!r} is not in the verbalizer; labels: {', '.join(self.labels)}"
            ) from None


@dataclass
class Verbalizer:
    """Label -> word(s).

    Attributes:
        mapping: Label -> word or list of words (primary first). Normalized to lists.
    """

    mapping: dict[str, str | list[str]]

    def __post_init__(self) -> None:
        if not isinstance(self.mapping, dict) or not self.mapping:
            raise ValueError(f"Verbalizer.mapping must be a non-empty dict, got {self.mapping!r}")
        normalized: dict[str, str | list[str]] = {}
        owner: dict[str, str] = {}
        for label, value in self.mapping.items():
            if not isinstance(label, str) or not label:
                raise ValueError(f"Verbalizer.mapping: label {label!r} must be a non-empty string")
            words = [value] if isinstance(value, str) else value
            if not isinstance(words, list) or not words:
                raise ValueError(
                    f"Verbalizer.mapping[{label!r}] must be a word or a non-empty "
                    f"list of words, got {value!r}"
                )
            for word in words:
                if not isinstance(word, str) or not word:
                    raise ValueError(
                        f"Verbalizer.mapping[{label!r}]: word {word!r} must be a non-empty string"
                    )
                if owner.get(word, label) != label:
                    raise ValueError(
                        f"Verbalizer.mapping: word {word!r} is used by labels "
                        f"{owner[word]!r} and {label!r}"
                    )
                owner[word] = label
            normalized[label] = list(words)
        self.mapping = normalized

    @classmethod
    def default_for(cls, labels: Iterable[str]) -> Verbalizer:
        """Maps each label to itself with a leading space (``{"positive": " positive"}``)."""
        return cls({label: label if label.startswith(" ") else " " + label for label in labels})

    @property
    def labels(self) -> list[str]:
        """list[str]: Labels in mapping order."""
        return list(self.mapping)

    def words(self, label: str) -> list[str]:
        """Returns the words of ``label``, primary first."""
        if label not in self.mapping:
            raise ValueError(
                f"label {label!r} is not in the verbalizer; labels: {', '.join(self.labels)}"
            )
        return list(self.mapping[label])

    def to_json(self) -> str:
        """Returns JSON that `parse_verbalizer` reads back exactly (single words as strings)."""
        data = {
            label: words[0] if len(words) == 1 else list(words)
            for label, words in self.mapping.items()
        }
        return json.dumps(data, ensure_ascii=False)

    def check_labels(self, data_labels: Iterable[str]) -> None:
        """Checks that every label in the data has a word.

        Args:
            data_labels: The dataset's labels.

        Raises:
            ValueError: Naming the data labels missing from the verbalizer and its labels.
        """
        data = list(dict.fromkeys(data_labels))
        missing = [label for label in data if label not in self.mapping]
        if missing:
            raise ValueError(
                f"data label(s) {', '.join(repr(m) for m in missing)} not in the verbalizer; "
                f"verbalizer labels: {', '.join(repr(v) for v in self.labels)}"
            )
        extra = [label for label in self.labels if label not in data]
        if extra:
            logger.info("verbalizer labels not seen in the data: %s", ", ".join(extra))

    def tokenize(self, tokenizer: Any) -> TokenizedVerbalizer:
        """Tokenizes every word (``add_special_tokens=False``) and checks they can be told apart.

        Args:
            tokenizer: A Hugging Face tokenizer (anything with ``encode(text,
                add_special_tokens=False)``).

        Returns:
            TokenizedVerbalizer: Token ids per label.

        Raises:
            ValueError: A word tokenizes to nothing, or two labels' words tokenize identically
                (naming both labels, the words and the tokens).
        """
        variants: list[list[list[int]]] = []
        seen: dict[tuple[int, ...], tuple[str, str]] = {}
        for label, words in self.mapping.items():
            label_ids: list[list[int]] = []
            for word in words:
                ids = [int(i) for i in tokenizer.encode(word, add_special_tokens=False)]
                if not ids:
                    raise ValueError(
                        f"verbalizer word {word!r} for label {label!r} tokenizes to "
                        "no tokens; choose a word with visible characters"
                    )
                other = seen.setdefault(tuple(ids), (label, word))
                if other[0] != label:
                    raise ValueError(
                        f"labels {other[0]!r} (word {other[1]!r}) and {label!r} (word {word!r}) "
                        f"both tokenize to {ids} {_token_strings(tokenizer, ids)}; the model "
                        "could not tell them apart, choose different words"
                    )
                label_ids.append(ids)
            variants.append(label_ids)
        tokenized = TokenizedVerbalizer(
            labels=self.labels, label_token_ids=[v[0] for v in variants], variant_token_ids=variants
        )
        firsts = tokenized.first_token_ids
        if not tokenized.is_single_token and len(set(firsts)) < len(firsts):
            logger.warning(
                "verbalizer labels share a first token (%s); only full-sequence "
                "scoring can tell them apart",
                firsts,
            )
        return tokenized


def _token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    return list(convert(list(ids))) if convert is not None else []


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"verbalizer JSON has label {duplicates[0]!r} twice")
    return dict(pairs)


def parse_verbalizer(text: str) -> Verbalizer:
    """Parses a verbalizer from JSON or ``label=word`` pairs.

    Args:
        text: JSON object, e.g. ``'{"positive": " positive", "negative": [" bad", " awful"]}'``
            (words kept exactly), or ``"positive=great,negative=terrible|awful"`` (comma
            separates labels, ``|`` separates alternative words; spaces around items are
            stripped and each word gets a leading space).

    Returns:
        Verbalizer: The parsed verbalizer.

    Raises:
        ValueError: Malformed input, naming the position or item.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("verbalizer text is empty; expected JSON or label=word,label=word")
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"verbalizer JSON is malformed at column {exc.colno}: {exc.msg}"
            ) from None
        return Verbalizer(data)
    mapping: dict[str, str | list[str]] = {}
    for item in stripped.split(","):
        label, sep, words = (part.strip() for part in item.partition("="))
        if not sep or not label or not words:
            raise ValueError(
                f"verbalizer item {item.strip()!r} is not label=word; expected e.g. "
                "positive=great,negative=terrible"
            )
        if label in mapping:
            raise ValueError(f"verbalizer label {label!r} appears twice")
        parsed = [" " + word.strip() for word in words.split("|")]
        if any(word == " " for word in parsed):
            raise ValueError(f"verbalizer item {item.strip()!r} has an empty word")
        mapping[label] = parsed[0] if len(parsed) == 1 else parsed
    return Verbalizer(mapping)


def resolve_verbalizer(
    given: str | None, labels: Iterable[str], stored: dict[str, Any] | None = None
) -> Verbalizer:
    """The verbalizer of a run: ``given`` text (see :func:`parse_verbalizer`), else a stored
    mapping (a checkpoint's), else the default words of ``labels``; checked against them.

    Raises:
        ValueError: Malformed text, or words that do not cover the data's labels.
    """
    labels = list(labels)
    if given:
        verbalizer = parse_verbalizer(given)
    elif stored:
        verbalizer = Verbalizer(dict(stored))
    else:
        verbalizer = Verbalizer.default_for(labels)
    verbalizer.check_labels(labels)
    return verbalizer
