"""`softprompt inspect`: nearest vocabulary tokens, drift from the recomputed init, the text form."""

from __future__ import annotations

import pytest
import torch

from softprompt.core.checkpoint import load_prompt, save_prompt
from softprompt.core.config import PromptTuningConfig
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.evaluation.inspection import format_inspection, inspect_prompt, nearest_tokens
from softprompt.models import load_model
from softprompt.models.tiny import HIDDEN

WORDS = ["movie", "great", "terrible", "sports", "review"]
INIT_TEXT = "the movie was great"


@pytest.fixture
def model_dir(tiny):
    """The tiny setup's saved model (only read)."""
    return tiny.model


def _text_init_model(model_dir, num_virtual_tokens=6):
    base, tokenizer = load_model(str(model_dir))
    config = PromptTuningConfig(
        num_virtual_tokens=num_virtual_tokens, prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT,
        tokenizer_name_or_path=str(model_dir), seed=3,
    )
    return PromptTunedModel(base, config, tokenizer=tokenizer), tokenizer


def test_rows_copied_from_word_embeddings_are_nearest_to_those_words(model_dir, tmp_path):
    base, tokenizer = load_model(str(model_dir))
    ids = [tokenizer.convert_tokens_to_ids(word) for word in WORDS]
    rows = base.get_input_embeddings().weight[ids].detach().clone()
    rows[1] *= 3.0  # cosine ignores the scale
    model = PromptTunedModel(base, PromptTuningConfig(num_virtual_tokens=len(WORDS)), prompt_weights=rows)
    model.save_pretrained(tmp_path / "prompt", {"base_model": str(model_dir)})

    result = inspect_prompt(tmp_path / "prompt", top_k=3)
    assert result["model"] == str(model_dir)
    assert (result["num_virtual_tokens"], result["token_dim"]) == (len(WORDS), HIDDEN)
    for word, token_id, entry in zip(WORDS, ids, result["virtual_tokens"], strict=True):
        best = entry["nearest"][0]
        assert (best["token"], best["id"]) == (word, token_id)
        assert best["cosine"] == pytest.approx(1.0, abs=1e-4)
        assert len(entry["nearest"]) == 3
        assert entry["nearest"][1]["cosine"] < 0.999  # the runner-up is another token
        cosines = [item["cosine"] for item in entry["nearest"]]
        assert cosines == sorted(cosines, reverse=True)
    assert result["virtual_tokens"][1]["norm"] == pytest.approx(float(rows[1].norm()), rel=1e-5)


def test_nearest_tokens_match_a_brute_force_search(model_dir):
    base, tokenizer = load_model(str(model_dir))
    embeddings = base.get_input_embeddings()
    prompt = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(0))
    vocab = len(tokenizer)  # rows past the tokenizer's vocabulary are never reported
    table = torch.nn.functional.normalize(embeddings.weight[:vocab].detach(), dim=-1)
    expected = (torch.nn.functional.normalize(prompt, dim=-1) @ table.T).topk(5, dim=1)
    for chunk in (7, 16384):  # chunked and whole-table scans agree
        result = nearest_tokens(prompt, embeddings, tokenizer, top_k=5, chunk=chunk)
        for row, neighbours in enumerate(result):
            assert [token for _, token, _ in neighbours] == expected.indices[row].tolist()
            assert [score for _, _, score in neighbours] == pytest.approx(expected.values[row].tolist(), abs=1e-5)


def test_top_k_beyond_the_vocabulary_lists_each_token_once(model_dir):
    base, tokenizer = load_model(str(model_dir))
    prompt = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(0))
    for neighbours in nearest_tokens(prompt, base.get_input_embeddings(), tokenizer, top_k=100000, chunk=7):
        assert sorted(token for _, token, _ in neighbours) == list(range(len(tokenizer)))
        assert all(-1.0001 <= cosine <= 1.0001 for _, _, cosine in neighbours)


def test_drift_is_zero_right_after_init_and_measures_a_change(model_dir, tmp_path):
    model, tokenizer = _text_init_model(model_dir)
    model.save_pretrained(tmp_path / "untrained", {"base_model": str(model_dir)})
    untrained = inspect_prompt(tmp_path / "untrained")
    assert untrained["drift"]["available"]
    assert untrained["drift"]["total_norm"] == pytest.approx(0.0, abs=1e-6)
    assert untrained["drift"]["initial_norm"] == pytest.approx(float(model.get_prompt_embedding_to_save().norm()), rel=1e-5)
    assert all(token["drift"] == pytest.approx(0.0, abs=1e-6) for token in untrained["virtual_tokens"])

    change = torch.zeros(6, HIDDEN)
    change[2, :] = 0.5  # move one virtual token only
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.add_(change)
    model.save_pretrained(tmp_path / "trained", {"base_model": str(model_dir)})
    trained = inspect_prompt(tmp_path / "trained")
    assert trained["drift"]["total_norm"] == pytest.approx(float(change.norm()), rel=1e-5)
    drifts = [token["drift"] for token in trained["virtual_tokens"]]
    assert drifts[2] == pytest.approx(float(change[2].norm()), rel=1e-5)
    assert all(value == pytest.approx(0.0, abs=1e-6) for index, value in enumerate(drifts) if index != 2)


def test_format_inspection_shows_the_init_text_tokens(model_dir, tmp_path):
    model, _ = _text_init_model(model_dir)
    model.save_pretrained(tmp_path / "prompt", {"base_model": str(model_dir)})
    result = inspect_prompt(tmp_path / "prompt", top_k=2)
    assert result["init"]["strategy"] == "TEXT"
    assert result["init"]["text"] == INIT_TEXT
    assert result["init"]["text_tokens"] == ["the", "movie", "was", "great"]
    text = format_inspection(result)
    assert "init: TEXT  text='the movie was great'" in text
    assert "text tokenized to 4 tokens: ['the', 'movie', 'was', 'great']" in text
    assert "drift: |trained - initial| = 0.0000" in text
    lines = text.splitlines()
    # One line per virtual token; the text rows name their init token and are nearest to it.
    token_lines = lines[-6:]
    for index, word in enumerate(["the", "movie", "was", "great"]):
        assert token_lines[index].split()[:2] == [str(index), f"text:{word}"]
        assert f"'{word}' 1.00" in token_lines[index]
    assert token_lines[4].split()[1].startswith("sampled:")


def test_inspect_errors(model_dir, tmp_path):
    weights = torch.zeros(2, HIDDEN + 1)
    save_prompt(tmp_path / "wide", weights, PromptTuningConfig(num_virtual_tokens=2, token_dim=HIDDEN + 1))
    with pytest.raises(ValueError, match="does not name its base model"):
        inspect_prompt(tmp_path / "wide")
    with pytest.raises(ValueError, match=f"prompt has width {HIDDEN + 1} but the model's embedding size is {HIDDEN}"):
        inspect_prompt(tmp_path / "wide", model=str(model_dir))
    assert load_prompt(tmp_path / "wide").weights.shape == (2, HIDDEN + 1)


def _png_size(path):
    """(width, height) of a PNG, read from its IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_draws_one_bar_per_virtual_token_at_its_drift(model_dir, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from softprompt.evaluation.inspection import plot_inspection

    model, _ = _text_init_model(model_dir)
    with torch.no_grad():
        model.prompt_encoder.embedding.weight[4].add_(0.25)
    model.save_pretrained(tmp_path / "prompt", {"base_model": str(model_dir)})
    result = inspect_prompt(tmp_path / "prompt")
    bars = []
    original = Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda axis, x, height, **kw: bars.append(list(height)) or original(axis, x, height, **kw))
    path = plot_inspection(result, tmp_path / "plots" / "drift.png")  # the directory is made
    assert path == tmp_path / "plots" / "drift.png" and _png_size(path)[0] > 300
    assert bars == [[token["drift"] for token in result["virtual_tokens"]]]
    assert bars[0][4] == pytest.approx(0.25 * HIDDEN**0.5, rel=1e-4) and max(bars[0][:4]) < 1e-6
    assert [item.name for item in path.parent.iterdir()] == ["drift.png"]  # the temporary file is gone
