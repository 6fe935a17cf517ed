"""Datasets, prompt templates, verbalizers and batching for soft prompt training."""

from softprompt.data.batching import (
    length_grouped_batches,
    pad_batch,
    padding_fraction,
    sequential_batches,
)
from softprompt.data.preview import format_preview, preview_dataset
from softprompt.data.rotten_tomatoes import RottenTomatoesCorpus, read_rotten_tomatoes
from softprompt.data.sources import (
    SPLITS,
    DatasetSplits,
    Record,
    hash_split,
    load_dataset,
    normalize_text,
    text_bucket,
)
from softprompt.data.templates import (
    DEFAULT_INSTRUCTIONS,
    DEFAULT_TEMPLATES,
    GENERIC_TEMPLATE,
    Template,
    default_instruction,
    default_template,
)
from softprompt.data.tweet_sentiment import TweetSentimentCorpus, read_tweet_sentiment
from softprompt.data.verbalizer import (
    TokenizedVerbalizer,
    Verbalizer,
    parse_verbalizer,
    resolve_verbalizer,
)

__all__ = [
    "DEFAULT_INSTRUCTIONS",
    "DEFAULT_TEMPLATES",
    "GENERIC_TEMPLATE",
    "SPLITS",
    "DatasetSplits",
    "Record",
    "RottenTomatoesCorpus",
    "Template",
    "TokenizedVerbalizer",
    "TweetSentimentCorpus",
    "Verbalizer",
    "default_instruction",
    "default_template",
    "format_preview",
    "hash_split",
    "length_grouped_batches",
    "load_dataset",
    "normalize_text",
    "pad_batch",
    "padding_fraction",
    "parse_verbalizer",
    "resolve_verbalizer",
    "preview_dataset",
    "read_rotten_tomatoes",
    "read_tweet_sentiment",
    "sequential_batches",
    "text_bucket",
]
