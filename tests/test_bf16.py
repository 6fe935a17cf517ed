"""The equivalences of the fast paths hold in bfloat16 too, and what trains stays fp32.

Tiny models built in bf16 (``tiny_llama``, and ``tiny_gemma3`` whose sliding window is shorter
than the rows): mixed batch == separate, KV-cached == uncached (Engine), left padding == none
(``PromptTunedModel``), shared prefix == plain forward (``fastpath.prompt_kv``).

Tolerances. bf16 keeps 8 significant bits, so one rounding moves a value by at most 2^-8 of
its magnitude. The compared computations are the same function in another order (other batch
shapes and padding, keys/values cached or recomputed), so they differ by a few roundings per
layer; the mistakes these tests are for (a wrong position, padding let into attention, another
row's prompt) move results by whole units. Each tolerance below says how many roundings it
allows. The fp32 versions of these tests (test_engine, test_modeling, test_prompt_kv) use 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softprompt.core.checkpoint import save_prompt
from softprompt.core.combine import insert_prompt
from softprompt.core.config import PromptTuningConfig
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.data import Verbalizer, pad_batch
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import (
    compute_prompt_kv,
    prefixed_batch,
    run,
    stack_prompt_kv,
    uncached_batch,
)
from softprompt.fastpath.scoring import label_scores
from softprompt.inference import ClassifyResult, Engine
from softprompt.models.tiny import HIDDEN, PAD_ID, random_ids, tiny_gemma3, tiny_llama

BF16 = torch.bfloat16
BUILDERS = {"llama": tiny_llama, "gemma3": tiny_gemma3}
# Label probabilities: an fp32 softmax of bf16 logits below 1 in size, where one rounding is at
# most 2^-8; a softmax moves by at most half the logits' change, so 2^-7 allows four roundings
# of each logit. (Measured: at most 4e-4.)
PROBABILITY_ATOL = 2**-7
# Logits (sizes up to about 3): four roundings of 2^-8, relative and absolute. (Measured: 0, the
# same kernels on the same rows.)
LOGIT_TOLERANCE = {"rtol": 2**-6, "atol": 2**-6}
# Final hidden states of one text computed in batches of other shapes: the matmul library may
# pick other kernels per shape (it does on an AMD EPYC with avx512_bf16), so sums are rounded in
# another order. An element that is a small difference of large residual terms then moves by a
# rounding of those terms, not of itself: bound every element by 2^-5 (eight roundings) of the
# largest. (Measured: 0 on a Xeon with AMX; up to 1.1% of the largest on that EPYC.)
HIDDEN_RELATIVE = 2**-5
# Prompt gradients come back through every layer's bf16 backward, rounded along the way; 2^-4
# of the largest component allows 16 roundings. (Measured: at most 1% of it.)
GRADIENT_RELATIVE = 2**-4
# bf16 against fp32 on the same weights: the weights themselves are rounded (2^-9 on average)
# and the error grows over the layers; 2^-5 is eight roundings. (Measured: 1e-3.)
FP32_PROBABILITY_ATOL = 2**-5

SENTIMENT = {
    "template": "Review: {text}\nSentiment:",
    "verbalizer": {"positive": " positive", "negative": " negative"},
    "task": "classification",
}
TOPIC = {  # three labels, one of them two tokens long
    "template": "Topic: {text}\nAnswer:",
    "verbalizer": {"sports": " sports", "politics": " politics", "film": " the movie"},
    "task": "classification",
}
TEXTS = [
    "the movie was great and the acting was very good",
    "a terrible film",
    "sports",
    "i loved this book , it is wonderful",
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two saved classification tasks with prompts of 5 and 9 tokens."""
    root = tmp_path_factory.mktemp("bf16-prompts")
    saved = {}
    for name, length, metadata, seed in (("sentiment", 5, SENTIMENT, 1), ("topic", 9, TOPIC, 2)):
        weights = torch.randn(length, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 0.5
        config = PromptTuningConfig(num_virtual_tokens=length, token_dim=HIDDEN)
        saved[name] = save_prompt(root / name, weights, config, metadata)
    return saved


def _engine(model, tokenizer, prompts: dict[str, Path], **options) -> Engine:
    engine = Engine(model_and_tokenizer=(model, tokenizer), **options)
    for name, directory in prompts.items():
        engine.add_task(name, directory)
    return engine


def _requests() -> list[tuple[str, str]]:
    return [(task, text) for text in TEXTS for task in ("sentiment", "topic")]


def _assert_same(first: ClassifyResult, second: ClassifyResult, atol: float) -> None:
    assert first.task == second.task and list(first.probabilities) == list(second.probabilities)
    values = [torch.tensor(list(result.probabilities.values())) for result in (first, second)]
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=atol)


# ----------------------------------------------------------------------------- Engine
@pytest.mark.parametrize("name", list(BUILDERS))
def test_mixed_batch_equals_separate_runs(name, prompts, tokenizer):
    model = BUILDERS[name](dtype=BF16)
    # One padded forward for the whole batch: rows of both tasks and every length side by side.
    engine = _engine(model, tokenizer, prompts, bucket_overhead_tokens=10**9)
    requests = _requests()
    mixed = engine.classify(requests)
    for request, result in zip(requests, mixed, strict=True):
        _assert_same(result, engine.classify([request])[0], PROBABILITY_ATOL)
    assert engine.frozen.dtype == BF16


@pytest.mark.parametrize("name", list(BUILDERS))
def test_kv_cached_equals_uncached(name, prompts, tokenizer):
    model = BUILDERS[name](dtype=BF16)
    cached, uncached = (
        _engine(model, tokenizer, prompts, use_kv_cache=flag).classify(_requests())
        for flag in (True, False)
    )
    for first, second in zip(cached, uncached, strict=True):
        _assert_same(first, second, PROBABILITY_ATOL)


def test_bfloat16_probabilities_are_close_to_float32(prompts, tokenizer):
    """Not an equivalence: bf16 is a rounding of fp32, so the answers stay close."""
    results = [
        _engine(tiny_llama(dtype=dtype), tokenizer, prompts).classify(_requests())
        for dtype in (BF16, torch.float32)
    ]
    for first, second in zip(*results, strict=True):
        _assert_same(first, second, FP32_PROBABILITY_ATOL)


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize("name", list(BUILDERS))
def test_left_padding_equals_no_padding(name):
    rows = [random_ids(1, length, seed=index)[0] for index, length in enumerate((7, 3, 5))]
    model = PromptTunedModel(BUILDERS[name](dtype=BF16), PromptTuningConfig(num_virtual_tokens=5))
    ids, mask = pad_batch([row.tolist() for row in rows], PAD_ID, "left")
    with torch.no_grad():
        left = model(input_ids=ids, attention_mask=mask).logits
        assert left.dtype == BF16
        for index, row in enumerate(rows):
            alone = model(input_ids=row.unsqueeze(0)).logits[0]
            torch.testing.assert_close(left[index, -(5 + len(row)) :], alone, **LOGIT_TOLERANCE)


def _assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, fraction: float) -> None:
    """Every element of ``actual`` within ``fraction`` of ``expected``'s largest magnitude."""
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(actual, expected, rtol=0, atol=fraction * scale)


# ----------------------------------------------------------------------------- prompt keys/values
def _plain_hidden(frozen: FrozenModel, prompt: torch.Tensor, text: list[int]) -> torch.Tensor:
    """``(t, H)`` text hidden states of one unpadded ``[prompt, text]`` forward."""
    embeds = frozen.embed(torch.tensor([text]))
    combined = insert_prompt(prompt.unsqueeze(0).to(embeds.dtype), embeds, None)
    hidden = frozen.body(
        inputs_embeds=combined.inputs_embeds,
        attention_mask=combined.attention_mask,
        position_ids=combined.position_ids,
    ).last_hidden_state
    return hidden[0, prompt.shape[0] :]


def _texts() -> list[list[int]]:
    return [random_ids(1, n, seed=index)[0].tolist() for index, n in enumerate((7, 3, 5, 1))]


def _prompt() -> torch.Tensor:
    return torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_shared_prefix_equals_plain_forward(name):
    frozen = FrozenModel(BUILDERS[name](dtype=BF16))
    prompt, texts = _prompt(), _texts()
    with torch.no_grad():
        kv = compute_prompt_kv(frozen, prompt)
        assert kv.layers[0][0].dtype == BF16
        batches = (
            prefixed_batch(frozen, kv, texts),
            prefixed_batch(frozen, stack_prompt_kv([kv] * len(texts)), texts),
            uncached_batch(frozen, [prompt] * len(texts), texts),
        )
        outputs = [run(frozen, batch)[:, batch.text_offset :] for batch in batches]
        for row, text in enumerate(texts):
            expected = _plain_hidden(frozen, prompt, text)
            for hidden in outputs:
                _assert_close_to_scale(hidden[row, : len(text)], expected, HIDDEN_RELATIVE)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_prompt_gradients_are_fp32_and_equal_the_plain_forward(name):
    frozen = FrozenModel(BUILDERS[name](dtype=BF16).requires_grad_(False))
    texts = _texts()
    projection = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(9))
    gradients = {}
    for path in ("shared", "plain"):
        prompt = _prompt().requires_grad_(True)
        if path == "plain":
            rows = [_plain_hidden(frozen, prompt, text) for text in texts]
        else:
            hidden = run(frozen, prefixed_batch(frozen, compute_prompt_kv(frozen, prompt), texts))
            rows = [hidden[row, : len(text)] for row, text in enumerate(texts)]
        sum(((row.float() @ projection) ** 2).sum() for row in rows).backward()
        assert prompt.grad is not None and prompt.grad.dtype == torch.float32
        gradients[path] = prompt.grad
    _assert_close_to_scale(gradients["shared"], gradients["plain"], GRADIENT_RELATIVE)


# ----------------------------------------------------------------------------- what stays fp32
def test_prompt_optimizer_state_and_scores_stay_fp32(tokenizer):
    model = PromptTunedModel(tiny_llama(dtype=BF16), PromptTuningConfig(num_virtual_tokens=4))
    parameter = model.prompt_encoder.embedding.weight
    assert parameter.dtype == torch.float32 and model.base_model.dtype == BF16
    verbalizer = Verbalizer(dict(SENTIMENT["verbalizer"])).tokenize(tokenizer)
    ids = [tokenizer("the movie was great")["input_ids"], tokenizer("a terrible film")["input_ids"]]
    frozen = FrozenModel(model.base_model, tokenizer)
    scores = label_scores(frozen, ids, verbalizer, prefix=compute_prompt_kv(frozen, model.prompt))
    assert scores.dtype == torch.float32  # the label softmax and the loss are fp32
    loss = torch.nn.functional.cross_entropy(scores, torch.tensor([0, 1]))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    loss.backward()
    optimizer.step()
    assert parameter.dtype == parameter.grad.dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in optimizer.state[parameter].values()
               if value.is_floating_point())


def test_checkpoint_of_a_bf16_model_is_fp32(tmp_path):
    model = PromptTunedModel(tiny_llama(dtype=BF16), PromptTuningConfig(num_virtual_tokens=4))
    with torch.no_grad():  # a prompt that bf16 cannot represent exactly
        model.prompt_encoder.embedding.weight.add_(1e-4)
    saved = load_file(str(model.save_pretrained(tmp_path / "prompt") / "adapter_model.safetensors"))
    weights = saved["prompt_embeddings"]
    assert weights.dtype == torch.float32
    assert torch.equal(weights, model.get_prompt_embedding_to_save())
    assert not torch.equal(weights, weights.to(BF16).float())  # not rounded through bf16
    loaded = PromptTunedModel.from_pretrained(tiny_llama(dtype=BF16), tmp_path / "prompt")
    assert torch.equal(loaded.get_prompt_embedding_to_save(), weights)


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_cuda_bf16_engine_equivalences(prompts, tokenizer):
    """On a GPU: mixed == separate and cached == uncached in bf16, and close to CPU fp32."""
    model = tiny_llama(dtype=BF16).to("cuda")
    cached = _engine(model, tokenizer, prompts, bucket_overhead_tokens=10**9)
    uncached = _engine(model, tokenizer, prompts, use_kv_cache=False)
    reference = _engine(tiny_llama(), tokenizer, prompts).classify(_requests())
    requests = _requests()
    mixed = cached.classify(requests)
    for request, result, other, cpu in zip(
        requests, mixed, uncached.classify(requests), reference, strict=True
    ):
        _assert_same(result, cached.classify([request])[0], PROBABILITY_ATOL)
        _assert_same(result, other, PROBABILITY_ATOL)
        _assert_same(result, cpu, FP32_PROBABILITY_ATOL)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_loaded_half_precision_models_attend_in_fp32(name, tmp_path, tokenizer):
    """load_model in bf16 on CPU switches attention to fp32 (the CPU flash kernel is slow in
    bf16); its hidden states stay as close to fp32 as plain bf16 SDPA, and gradients flow."""
    from softprompt.models import load_model
    from softprompt.models.attention import FP32_SDPA

    builder = {"llama": tiny_llama, "gemma3": tiny_gemma3}[name]
    builder().save_pretrained(str(tmp_path / "model"))
    tokenizer.save_pretrained(str(tmp_path / "model"))
    half, _ = load_model(str(tmp_path / "model"), dtype="bfloat16")
    full, _ = load_model(str(tmp_path / "model"), dtype="float32")
    assert half.config._attn_implementation == FP32_SDPA
    assert full.config._attn_implementation == "sdpa"
    plain_half = builder(dtype=torch.bfloat16)  # same weights, bf16 SDPA
    prompt = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    texts = [random_ids(1, length, seed=length)[0].tolist() for length in (9, 3, 6)]
    hidden = {}
    for label, model in (("fp32-attention", half), ("bf16-attention", plain_half), ("fp32", full)):
        frozen = FrozenModel(model.requires_grad_(False))
        batch = prefixed_batch(frozen, compute_prompt_kv(frozen, prompt), texts)
        hidden[label] = run(frozen, batch)[:, : max(map(len, texts))].float()  # granule padding off
    mask = torch.zeros(hidden["fp32"].shape[:2], dtype=torch.bool)
    for row, text in enumerate(texts):
        mask[row, : len(text)] = True
    # Upcasting attention may only help: its error against fp32 is at most bf16 SDPA's (plus
    # one bf16 rounding of the output, 2^-8 relative).
    ours = (hidden["fp32-attention"] - hidden["fp32"])[mask].abs().max()
    theirs = (hidden["bf16-attention"] - hidden["fp32"])[mask].abs().max()
    assert ours <= theirs * 1.1 + 2**-8
    hidden["fp32-attention"][mask].sum().backward()
    assert prompt.grad is not None and torch.isfinite(prompt.grad).all() and prompt.grad.abs().sum() > 0
