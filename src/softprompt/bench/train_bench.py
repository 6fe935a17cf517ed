"""`softprompt bench train`: softprompt's training fast path against PEFT prompt tuning.

Both sides run in one process on the same frozen weights (loaded once; PEFT wraps the same
module, and prompt tuning injects nothing into it), the same examples in the same batches, the
same prompt length, the same initial prompt and the same optimizer (AdamW, constant lr).

* softprompt: ``ClassificationObjective.loss(..., shared_prefix=True)`` on length-grouped
  batches: verbalizer cross-entropy over the label words' logits at the last real position.
* PEFT (``peft``): its documented CAUSAL_LM recipe: input = rendered text + label word, labels
  -100 except the label word, ``model(input_ids, attention_mask, labels)`` (full-vocabulary LM
  head at every position), every example padded to one fixed length (the longest benchmark
  example). Padding is on the right, so PEFT computes the same function as softprompt; PEFT's
  example pads on the left, which costs the same but puts padding between prompt and text.
* PEFT with per-batch padding (``peft_dynamic``): the same, padded to the batch's longest row.

Every variant first runs one untimed warm-up step (gradient discarded); then the repeats
alternate between the variants, each from the initial prompt with a fresh optimizer. Throughput
is the median over repeats. Peak memory comes from one fresh worker process per variant (see
:func:`_memory_worker`), since a process's peak RSS cannot be split between two sides.

FLOPs of a softprompt step (weights frozen, so backward computes activation gradients only,
about the forward's linear FLOPs again; attention backward counts twice its forward)::

    linear    = 2 * P_body * positions            (forward; the same again in backward)
    attention = 4 * L * d_attn * query_key_pairs  (forward; twice that in backward)
    positions = n + B*T, pairs = n*n + B*T*(n+T)  (shared prefix: the prompt runs once)
    positions = B*(n+T), pairs = B*(n+T)^2        (prompt in every row)

with P_body the decoder body's linear weights, L layers, d_attn = heads * head_dim, T the
batch's padded text length. The verbalizer head (B x H x 2) is negligible. PEFT additionally
pays the LM head: 2 * H * V per position forward and again backward.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softprompt.bench.common import (
    TEMPLATE,
    VERBALIZER,
    attention_width,
    body_linear_parameters,
    current_rss_mb,
    device_facts,
    format_number,
    load_bench_model,
    matmul_peak_gflops,
    median,
    peak_rss_mb,
    ratio,
    reset_peak_rss,
    resolve_device,
    run_workers,
    timed,
)
from softprompt.bench.options import TrainBenchOptions
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import compute_prompt_kv
from softprompt.fastpath.scoring import label_scores

logger = logging.getLogger(__name__)

MAX_LENGTH = 256
MEMORY_STEPS = 3
# Float32 rounding between two GEMM blockings stays far below this; a real mismatch (another
# layout, positions, or prompt) moves label logits by whole units.
SAME_FUNCTION_TOLERANCE = 1e-3
# bf16 (fp16) keeps 8 (11) significant bits, so the two sides' orders of the same function
# differ by a few roundings at the logits' size: up to 2^-4 of the largest label logit is
# allowed (SmolLM2-135M in bf16, --quick: 0.31 at label logits up to 18, so 1.13 allowed).
LOW_PRECISION_SAME_FUNCTION_RELATIVE = 2**-4


@dataclass(frozen=True)
class Variant:
    """One way of running the training steps."""

    name: str
    system: str  # "softprompt" or "peft"
    shared_prefix: bool = False
    grouped: bool = True
    fixed_padding: bool = False


MAIN = (
    Variant("softprompt", "softprompt", shared_prefix=True, grouped=True),
    Variant("peft", "peft", grouped=True, fixed_padding=True),
    Variant("peft_dynamic", "peft", grouped=True),
)
LEVERS = (
    Variant("plain", "softprompt", shared_prefix=False, grouped=False),
    Variant("shared_prefix", "softprompt", shared_prefix=True, grouped=False),
    Variant("length_grouping", "softprompt", shared_prefix=False, grouped=True),
    Variant("peft_dynamic_random_order", "peft", grouped=False),
)
VARIANTS = {variant.name: variant for variant in MAIN + LEVERS}


class TrainSetup:
    """The model, data, batch plans and both prompted models of one benchmark run."""

    def __init__(self, options: TrainBenchOptions, validation: bool = True) -> None:
        from softprompt.data import Template, Verbalizer, length_grouped_batches, load_dataset
        from softprompt.training.objectives import ClassificationObjective

        self.options = options
        self.device = resolve_device(options.device)
        self.model, self.tokenizer, self.dtype = load_bench_model(
            options.model, self.device, options.dtype
        )
        verbalizer = Verbalizer(dict(VERBALIZER)).tokenize(self.tokenizer)
        if not verbalizer.is_single_token:
            raise ValueError(
                f"{options.model}: the benchmark verbalizer must be single-token words"
            )
        self.objective = ClassificationObjective(
            self.tokenizer, Template(TEMPLATE), verbalizer, "label", MAX_LENGTH
        )
        splits = load_dataset("rotten_tomatoes")
        count = options.steps * options.batch_size
        if count > len(splits.train):
            raise ValueError(
                f"steps * batch_size = {count} exceeds the {len(splits.train)} training examples"
            )
        chosen = np.random.default_rng(options.seed).permutation(len(splits.train))[:count]
        self.train = self.objective.encode([splits.train[int(index)] for index in chosen])
        self.validation = (
            self.objective.encode(splits.validation[: options.eval_examples])
            if validation
            else None
        )
        self.lengths = self.objective.lengths(self.train)
        self.label_ids = [verbalizer.label_token_ids[target] for target in self.train.targets]
        # Every plan covers exactly the chosen examples: grouped sorts lengths across the pool
        # (as the trainer does), random only within each batch (pool_factor=1).
        self.plans = {
            True: length_grouped_batches(self.lengths, options.batch_size, seed=options.seed),
            False: length_grouped_batches(
                self.lengths, options.batch_size, seed=options.seed, pool_factor=1
            ),
        }
        self.fixed_length = max(
            len(s) + len(w) for s, w in zip(self.train.sequences, self.label_ids, strict=True)
        )
        self.pad_id = self.tokenizer.pad_token_id
        self.prompted = self._softprompt_model()
        self.initial = self.prompted.get_prompt_embedding_to_save()
        self.frozen = FrozenModel(self.model, self.tokenizer)
        self.peft_model: Any = None

    def _softprompt_model(self) -> Any:
        from softprompt.core.config import PromptTuningConfig
        from softprompt.core.prompt_model import PromptTunedModel
        from softprompt.training.options import DEFAULT_INIT_TEXT

        options = self.options
        init = options.init.upper()
        config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=options.num_virtual_tokens,
            prompt_tuning_init=init,
            prompt_tuning_init_text=DEFAULT_INIT_TEXT if init == "TEXT" else None,
            prompt_tuning_init_labels=[word for word in VERBALIZER.values()]
            if init == "CLASS_LABEL"
            else None,
            tokenizer_name_or_path=options.model,
            seed=options.seed,
        )
        torch.manual_seed(options.seed)
        return PromptTunedModel(self.model, config, tokenizer=self.tokenizer).eval()

    def build_peft(self) -> None:
        """Wrap the same frozen model with PEFT and give it softprompt's initial prompt."""
        import peft

        config = peft.PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=self.options.num_virtual_tokens,
            prompt_tuning_init="RANDOM",
        )
        self.peft_model = peft.get_peft_model(self.model, config).eval()
        weight = self.peft_model.prompt_encoder.default.embedding.weight
        with torch.no_grad():
            weight.copy_(self.initial.to(weight.device))

    # ------------------------------------------------------------------ steps
    def parameter(self, system: str) -> torch.nn.Parameter:
        if system == "softprompt":
            return self.prompted.prompt_encoder.embedding.weight
        return self.peft_model.prompt_encoder.default.embedding.weight

    def peft_inputs(
        self, batch: list[int], fixed: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100 but the label word)."""
        rows = [self.train.sequences[i] + self.label_ids[i] for i in batch]
        width = self.fixed_length if fixed else max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for row, (index, tokens) in enumerate(zip(batch, rows, strict=True)):
            text_length = len(self.train.sequences[index])
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
            labels[row, text_length : len(tokens)] = torch.tensor(self.label_ids[index])
        return ids.to(self.device), mask.to(self.device), labels.to(self.device)

    def step(
        self, variant: Variant, batch: list[int], optimizer: torch.optim.Optimizer | None
    ) -> float:
        """One forward + backward (+ optimizer step); returns the loss."""
        if variant.system == "softprompt":
            loss = self.objective.loss(
                self.frozen, self.prompted.prompt, self.train, batch, variant.shared_prefix
            )
        else:
            ids, mask, labels = self.peft_inputs(batch, variant.fixed_padding)
            loss = self.peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def reset(self, system: str) -> torch.nn.Parameter:
        parameter = self.parameter(system)
        with torch.no_grad():
            parameter.copy_(self.initial.to(parameter.device))
        parameter.grad = None
        return parameter

    def warm_up(self, variant: Variant) -> None:
        """One untimed forward + backward on the variant's first batch (gradient discarded)."""
        self.step(variant, self.plans[variant.grouped][0], None)
        self.reset(variant.system)

    def repeat(self, variant: Variant) -> tuple[float, list[float], torch.Tensor]:
        """The timed steps from the initial prompt with a fresh optimizer.

        Returns:
            Seconds, the loss of every step, and the trained prompt.
        """
        from softprompt.training.optim import make_optimizer

        batches = self.plans[variant.grouped]
        parameter = self.reset(variant.system)
        optimizer = make_optimizer([parameter], "adamw", self.options.lr)
        losses: list[float] = []

        def run() -> None:
            for batch in batches:
                losses.append(self.step(variant, batch, optimizer))

        _, seconds = timed(run, self.device)
        return seconds, losses, parameter.detach().clone()

    # ------------------------------------------------------------------ accounting
    def text_tokens(self) -> int:
        """Real text tokens of all the examples (what both sides must process)."""
        return sum(self.lengths)

    def positions(self, variant: Variant) -> int:
        """Positions the model runs over all batches (prompt, padding and label word included)."""
        n = self.options.num_virtual_tokens
        total = 0
        for batch in self.plans[variant.grouped]:
            longest = max(self.lengths[i] for i in batch)
            if variant.system == "peft":
                width = (
                    self.fixed_length
                    if variant.fixed_padding
                    else max(self.lengths[i] + len(self.label_ids[i]) for i in batch)
                )
                total += len(batch) * (n + width)
            elif variant.shared_prefix:
                total += n + len(batch) * longest
            else:
                total += len(batch) * (n + longest)
        return total

    def flops(self, variant: Variant) -> float:
        """Analytic forward + backward FLOPs of all the batches (module docstring)."""
        n = self.options.num_virtual_tokens
        params = body_linear_parameters(self.model)
        config = (
            self.model.config.get_text_config()
            if hasattr(self.model.config, "get_text_config")
            else self.model.config
        )
        attention = 4.0 * config.num_hidden_layers * attention_width(self.model)
        head = 2.0 * config.hidden_size * config.vocab_size
        total = 0.0
        for batch in self.plans[variant.grouped]:
            size = len(batch)
            if variant.system == "peft":
                width = (
                    self.fixed_length
                    if variant.fixed_padding
                    else max(self.lengths[i] + len(self.label_ids[i]) for i in batch)
                )
                positions, pairs = size * (n + width), size * (n + width) ** 2
                total += 2 * head * positions
            else:
                longest = max(self.lengths[i] for i in batch)
                if variant.shared_prefix:
                    positions, pairs = n + size * longest, n * n + size * longest * (n + longest)
                else:
                    positions, pairs = size * (n + longest), size * (n + longest) ** 2
            total += 2 * (2.0 * params * positions) + 3 * attention * pairs
        return total

    def padding_fraction(self, variant: Variant) -> float:
        from softprompt.data import padding_fraction

        if variant.system == "peft":
            sizes = [self.lengths[i] + len(self.label_ids[i]) for i in range(len(self.lengths))]
            if variant.fixed_padding:
                return 1 - sum(sizes) / (self.fixed_length * len(sizes))
            return padding_fraction(sizes, self.plans[variant.grouped])
        return padding_fraction(self.lengths, self.plans[variant.grouped])

    def same_function_difference(self) -> tuple[float, float]:
        """Max |label-word logit difference| between softprompt and PEFT at the initial prompt,
        and the largest difference that rounding in the model's dtype explains."""
        batch = self.plans[True][0]
        n = self.options.num_virtual_tokens
        with torch.no_grad():
            ours = label_scores(
                self.frozen, [self.train.sequences[i] for i in batch], self.objective.verbalizer,
                prefix=compute_prompt_kv(self.frozen, self.prompted.prompt),
            )
            ids, mask, _ = self.peft_inputs(batch, fixed=True)
            logits = self.peft_model(input_ids=ids, attention_mask=mask).logits
            last = (
                n
                + torch.tensor([len(self.train.sequences[i]) for i in batch], device=self.device)
                - 1
            )
            label_ids = torch.tensor(self.objective.verbalizer.first_token_ids, device=self.device)
            theirs = logits[torch.arange(len(batch), device=self.device), last][:, label_ids]
        difference = float((ours.float() - theirs.float()).abs().max())
        if self.frozen.dtype == torch.float32:
            return difference, SAME_FUNCTION_TOLERANCE
        scale = float(ours.float().abs().max())
        return difference, max(
            SAME_FUNCTION_TOLERANCE, LOW_PRECISION_SAME_FUNCTION_RELATIVE * scale
        )

    def validate(self, prompt: torch.Tensor) -> dict[str, Any]:
        """Validation metrics of ``prompt`` with softprompt's scoring code."""
        return self.objective.evaluate(self.frozen, prompt.to(self.device), self.validation)


# ---------------------------------------------------------------------------- run
MAIN_NAMES = ("softprompt", "peft", "peft_dynamic")
LEVER_LABELS = {  # label in the result -> variant
    "plain": "plain",
    "shared_prefix": "shared_prefix",
    "length_grouping": "length_grouping",
    "both": "softprompt",
    "peft_dynamic_random_order": "peft_dynamic_random_order",
}


@dataclass
class Timings:
    """Seconds of every repeat, the losses and the trained prompt of the last one, per variant."""

    seconds: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    losses: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    trained: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def median_seconds(self, name: str) -> float:
        return median(self.seconds[name])


def run_train_bench(options: TrainBenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the result object (see the module docstring)."""
    setup = TrainSetup(options)
    setup.build_peft()
    # At the initial prompt, before training.
    same_function, same_function_tolerance = setup.same_function_difference()
    timings = _time_variants(setup, MAIN + (LEVERS if options.levers else ()))
    # Workers load the model in the dtype resolved here, so all variants measure the same thing.
    resolved = dataclasses.replace(options, dtype=setup.dtype.dtype)
    memory = _measure_memory(resolved) if options.memory else {}
    result: dict[str, Any] = {
        "bench": "train",
        "model": options.model,
        "quick": options.quick,
        **device_facts(setup.device),
        **setup.dtype.report_fields(),
        "options": dataclasses.asdict(options),
        "train_examples": len(setup.lengths),
        "train_text_tokens": setup.text_tokens(),
        "validation_examples": len(setup.validation),
        "peft_fixed_length": setup.fixed_length,
    }
    result.update(_throughput_fields(setup, timings))
    result.update(_memory_fields(memory, setup.device))
    result.update(_quality_fields(setup, timings))
    result["initial_label_logit_max_difference"] = same_function
    result["same_function_tolerance"] = same_function_tolerance
    result["same_function"] = same_function < same_function_tolerance
    result.update(_compute_fields(setup, timings))
    result["levers"] = _levers(setup, timings)
    return result


def _time_variants(setup: TrainSetup, variants: tuple[Variant, ...]) -> Timings:
    """A warm-up step per variant, then the repeats, alternating between the variants."""
    timings = Timings({variant.name: [] for variant in variants})
    for variant in variants:
        setup.warm_up(variant)
    for index in range(setup.options.repeats):
        for variant in variants:
            took, losses, prompt = setup.repeat(variant)
            timings.seconds[variant.name].append(took)
            timings.losses[variant.name], timings.trained[variant.name] = losses, prompt
            logger.info(
                "repeat %d %-26s %.2f s, loss %.4f", index + 1, variant.name, took, losses[-1]
            )
    return timings


def _throughput_fields(setup: TrainSetup, timings: Timings) -> dict[str, Any]:
    examples, tokens = len(setup.lengths), setup.text_tokens()
    fields: dict[str, Any] = {}
    for name in MAIN_NAMES:
        took = timings.median_seconds(name)
        fields[f"{name}_examples_per_second"] = examples / took
    fields["ratio"] = ratio(
        fields["softprompt_examples_per_second"], fields["peft_examples_per_second"]
    )
    fields["ratio_vs_dynamic"] = ratio(
        fields["softprompt_examples_per_second"], fields["peft_dynamic_examples_per_second"]
    )
    for name in MAIN_NAMES:
        took = timings.median_seconds(name)
        fields[f"{name}_tokens_per_second"] = tokens / took
        fields[f"{name}_positions_per_second"] = setup.positions(VARIANTS[name]) / took
        fields[f"{name}_padding_fraction"] = setup.padding_fraction(VARIANTS[name])
        fields[f"{name}_seconds"] = timings.seconds[name]
    return fields


def _memory_fields(memory: dict[str, dict[str, Any]], device: torch.device) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in MAIN_NAMES:
        fields[f"{name}_peak_rss_mb"] = memory.get(name, {}).get("peak_rss_mb")
        fields[f"{name}_peak_rss_delta_mb"] = memory.get(name, {}).get("peak_rss_delta_mb")
        if device.type == "cuda":
            fields[f"{name}_peak_cuda_mb"] = memory.get(name, {}).get("peak_cuda_mb")
    fields["memory_method"] = _memory_method(memory)
    return fields


def _quality_fields(setup: TrainSetup, timings: Timings) -> dict[str, Any]:
    """Training losses of every main variant; validation metrics of both trained prompts."""
    fields: dict[str, Any] = {}
    for name in MAIN_NAMES:
        fields[f"{name}_loss"] = timings.losses[name][-1]
        fields[f"{name}_first_loss"] = timings.losses[name][0]
        fields[f"{name}_losses"] = timings.losses[name]
    fields["loss_definitions"] = {
        "softprompt": "cross-entropy over the 2 label words' logits (verbalizer softmax)",
        "peft": "full-vocabulary LM cross-entropy on the label word token",
    }
    validation = {name: setup.validate(timings.trained[name]) for name in ("softprompt", "peft")}
    accuracy = {name: metrics["accuracy"] for name, metrics in validation.items()}
    difference = accuracy["softprompt"] - accuracy["peft"]
    # Standard error of a difference of two accuracies on n examples (independent approximation).
    noise = math.sqrt(sum(p * (1 - p) for p in accuracy.values()) / max(1, len(setup.validation)))
    fields.update(
        {
            "softprompt_validation_accuracy": accuracy["softprompt"],
            "peft_validation_accuracy": accuracy["peft"],
            "softprompt_validation_loss": validation["softprompt"]["loss"],
            "peft_validation_loss": validation["peft"]["loss"],
            "validation_accuracy_difference": difference,
            "validation_accuracy_standard_error": noise,
            "validation_accuracy_within_noise": abs(difference) <= 2 * noise,
        }
    )
    return fields


def _compute_fields(setup: TrainSetup, timings: Timings) -> dict[str, Any]:
    """Achieved GFLOP/s (analytic FLOPs, module docstring) against a measured GEMM peak."""
    config = setup.model.config.get_text_config()
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    # The MLP up-projection's GEMM on a typical batch: (B*T, hidden) x (hidden, intermediate).
    plan = setup.plans[True]
    rows = round(float(np.mean([len(b) * max(setup.lengths[i] for i in b) for b in plan])))
    repeats = 3 if setup.options.quick else 5
    peak = matmul_peak_gflops(rows, hidden, intermediate, setup.device, repeats=repeats)
    # A large square GEMM: what the device reaches on ideal shapes (context for the above).
    size = 1024 if setup.options.quick else 4096 if setup.device.type == "cuda" else 2048
    large = matmul_peak_gflops(size, size, size, setup.device, repeats=repeats)
    achieved = setup.flops(VARIANTS["softprompt"]) / timings.median_seconds("softprompt") / 1e9
    peft = setup.flops(VARIANTS["peft"]) / timings.median_seconds("peft") / 1e9
    return {
        "achieved_gflops": achieved,
        "peft_achieved_gflops": peft,
        "matmul_peak_gflops": peak,
        "fraction_of_peak": ratio(achieved, peak),
        "matmul_shape": [rows, hidden, intermediate],
        "matmul_large_peak_gflops": large,
        "fraction_of_large_peak": ratio(achieved, large),
        "matmul_large_shape": [size, size, size],
        "flop_formula": (
            "per step: 2*(2*P_body*positions) + 3*(4*L*d_attn*query_key_pairs); "
            "softprompt shared prefix: positions = n + B*T, pairs = n^2 + B*T*(n+T); "
            "PEFT adds 2*(2*H*V) per position"
        ),
        "body_linear_parameters": body_linear_parameters(setup.model),
    }


def _levers(setup: TrainSetup, timings: Timings) -> dict[str, Any]:
    """Each softprompt lever alone and together (plus PEFT on unsorted batches)."""
    examples, tokens = len(setup.lengths), setup.text_tokens()
    plain = examples / timings.median_seconds("plain") if "plain" in timings.seconds else None
    levers = {}
    for label, name in LEVER_LABELS.items():
        if name not in timings.seconds:
            continue
        variant, took = VARIANTS[name], timings.median_seconds(name)
        levers[label] = {
            "shared_prefix": variant.shared_prefix,
            "length_grouping": variant.grouped,
            "examples_per_second": examples / took,
            "tokens_per_second": tokens / took,
            "speedup_vs_plain": ratio(examples / took, plain),
            "padding_fraction": setup.padding_fraction(variant),
            "loss": timings.losses[name][-1],
        }
    return levers


# ---------------------------------------------------------------------------- memory
def _measure_memory(options: TrainBenchOptions) -> dict[str, dict[str, Any]]:
    """Peak memory of each main variant, each in its own fresh worker process (run side by side)."""
    payload = json.dumps(dataclasses.asdict(options))
    commands = {
        variant.name: [
            sys.executable,
            "-m",
            "softprompt.bench.train_bench",
            "--memory-worker",
            variant.name,
            "--options",
            payload,
            "--threads",
            str(torch.get_num_threads()),
        ]
        for variant in MAIN
    }
    results = run_workers(commands)
    for name, value in results.items():
        if "error" in value:
            logger.warning("memory worker %s failed: %s", name, value["error"])
    return results


def _memory_method(memory: dict[str, dict[str, Any]]) -> str:
    if not memory:
        return "not measured (--no-memory)"
    reset = all(value.get("peak_reset") for value in memory.values())
    scope = "after setup (VmHWM reset)" if reset else "process lifetime (ru_maxrss)"
    return (
        f"one fresh process per variant; peak RSS {scope} over {MEMORY_STEPS} steps "
        "on the largest batches"
    )


def _memory_worker(options: TrainBenchOptions, name: str) -> dict[str, Any]:
    """Set up, then run the variant's largest batches and report the peak memory they needed."""
    from softprompt.training.optim import make_optimizer

    variant = VARIANTS[name]
    setup = TrainSetup(options, validation=False)
    if variant.system == "peft":
        setup.build_peft()
    plan = setup.plans[variant.grouped]
    largest = sorted(plan, key=lambda batch: -len(batch) * max(setup.lengths[i] for i in batch))
    parameter = setup.reset(variant.system)
    optimizer = make_optimizer([parameter], "adamw", options.lr)
    before = current_rss_mb()
    reset = reset_peak_rss()
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(setup.device)
    for batch in largest[:MEMORY_STEPS]:
        setup.step(variant, batch, optimizer)
    peak = peak_rss_mb()
    result = {
        "peak_rss_mb": peak,
        "rss_before_mb": before,
        "peak_rss_delta_mb": peak - before,
        "peak_reset": reset,
    }
    if setup.device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(setup.device) / (1024 * 1024)
    return result


# ---------------------------------------------------------------------------- text report
def format_train(result: dict[str, Any]) -> list[str]:
    """The result as a short text report."""
    lines = [
        f"bench train: {result['model']} on {result['device']} ({result['device_name']}), "
        f"{result['options']['steps']} steps x batch {result['options']['batch_size']}, "
        f"n={result['options']['num_virtual_tokens']}"
        + (" [QUICK: not a result]" if result["quick"] else ""),
        f"{'':<14}{'examples/s':>12}{'tokens/s':>12}{'peak RSS MB':>13}{'loss':>9}{'val acc':>9}",
    ]
    for name in ("softprompt", "peft", "peft_dynamic"):
        lines.append(
            f"{name:<14}{format_number(result[f'{name}_examples_per_second']):>12}"
            f"{format_number(result[f'{name}_tokens_per_second'], 0):>12}"
            f"{format_number(result[f'{name}_peak_rss_mb'], 0):>13}"
            f"{format_number(result[f'{name}_loss'], 4):>9}"
            f"{format_number(result.get(f'{name}_validation_accuracy'), 3):>9}"
        )
    lines.append(
        f"ratio softprompt/PEFT: {format_number(result['ratio'])}x "
        f"(vs per-batch padding: {format_number(result['ratio_vs_dynamic'])}x)"
    )
    lines.append(
        f"achieved {format_number(result['achieved_gflops'], 1)} GFLOP/s of a "
        f"{format_number(result['matmul_peak_gflops'], 1)} GFLOP/s matmul peak "
        f"({format_number(100 * (result['fraction_of_peak'] or 0), 1)}%; large GEMM "
        f"{format_number(result['matmul_large_peak_gflops'], 1)} GFLOP/s); "
        f"same function as PEFT: {result['same_function']}"
    )
    for label, lever in result["levers"].items():
        lines.append(
            f"  lever {label:<26}{format_number(lever['examples_per_second']):>10} ex/s"
            f"  x{format_number(lever['speedup_vs_plain'])} vs plain,"
            f" padding {format_number(100 * lever['padding_fraction'], 1)}%"
        )
    return lines


def _worker_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="memory worker of softprompt bench train (internal)"
    )
    parser.add_argument("--memory-worker", required=True, choices=sorted(VARIANTS))
    parser.add_argument("--options", required=True)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    options = TrainBenchOptions(**json.loads(args.options))
    print(json.dumps(_memory_worker(options, args.memory_worker)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
