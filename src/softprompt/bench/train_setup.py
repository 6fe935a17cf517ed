"""The training workload of ``softprompt bench train``: one model in one dtype, both sides.

Both sides run on the same frozen weights (PEFT wraps the same module, and prompt tuning
injects nothing into it), the same examples in the same batches, the same prompt length, the
same initial prompt and the same optimizer (AdamW, constant lr). The variants:

* ``softprompt``: ``ClassificationObjective.loss(..., shared_prefix=True)`` on length-grouped
  batches: verbalizer cross-entropy over the label words' logits at the last real position.
* ``peft``: PEFT's documented CAUSAL_LM recipe: input = rendered text + label word, labels -100
  except the label word, ``model(input_ids, attention_mask, labels)`` (full-vocabulary LM head at
  every position), every example padded to one fixed length (the longest benchmark example).
  Padding is on the right, so PEFT computes the same function as softprompt; PEFT's example pads
  on the left, which costs the same but puts padding between prompt and text.
* ``peft_dynamic``: the same, padded to the batch's longest row.
* the levers: softprompt with each speed lever alone, and PEFT on unsorted batches.

FLOPs of a softprompt step (weights frozen, so backward computes activation gradients only,
about the forward's linear FLOPs again; attention backward counts twice its forward)::

    linear    = 2 * P_body * positions            (forward; the same again in backward)
    attention = 4 * L * d_attn * query_key_pairs  (forward; twice that in backward)
    positions = n + B*T, pairs = n*n + B*T*(n+T)  (shared prefix: the prompt runs once)
    positions = B*(n+T), pairs = B*(n+T)^2        (prompt in every row)

with P_body the decoder body's linear weights, L layers, d_attn = heads * head_dim, T the
batch's padded text length (softprompt pads it to the model's length granule in bf16 on CPU).
The verbalizer head (B x H x 2) is negligible. PEFT additionally pays the LM head: 2 * H * V per
position forward and again backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from softprompt.bench.common import (
    TEMPLATE,
    VERBALIZER,
    attention_width,
    body_linear_parameters,
    load_bench_model,
    resolve_device,
)
from softprompt.bench.options import TrainBenchOptions
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import compute_prompt_kv
from softprompt.fastpath.scoring import label_scores

MAX_LENGTH = 256
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
    compiled: bool = False  # softprompt's frozen body through torch.compile


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
COMPILED = Variant("softprompt_compiled", "softprompt", shared_prefix=True, compiled=True)
VARIANTS = {variant.name: variant for variant in MAIN + LEVERS + (COMPILED,)}


class TrainSetup:
    """The model (in ``options.dtype``, a dtype name), data, batch plans and both prompted models
    of one benchmark run."""

    def __init__(self, options: TrainBenchOptions, validation: bool = True) -> None:
        from softprompt.data import Template, Verbalizer, length_grouped_batches, load_dataset
        from softprompt.training.objectives import ClassificationObjective

        self.options = options
        self.device = resolve_device(options.device)
        self.model, self.tokenizer = load_bench_model(options.model, self.device, options.dtype)
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
        self.compiled_frozen = (
            FrozenModel(self.model, self.tokenizer, compile=True) if options.compile else None
        )
        self.peft_model: Any = None

    def _softprompt_model(self) -> Any:
        from softprompt.core.config import PromptTuningConfig
        from softprompt.core.prompt_model import PromptTunedModel
        from softprompt.data.templates import DEFAULT_INSTRUCTIONS

        options = self.options
        init = options.init.upper()
        config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=options.num_virtual_tokens,
            prompt_tuning_init=init,
            prompt_tuning_init_text=DEFAULT_INSTRUCTIONS["rotten_tomatoes"] if init == "TEXT" else None,
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

    def step(self, variant: Variant, batch: list[int], optimizer: torch.optim.Optimizer) -> float:
        """One forward + backward + optimizer step; returns the loss."""
        if variant.system == "softprompt":
            frozen = self.compiled_frozen if variant.compiled else self.frozen
            loss = self.objective.loss(
                frozen, self.prompted.prompt, self.train, batch, variant.shared_prefix
            )
        else:
            ids, mask, labels = self.peft_inputs(batch, variant.fixed_padding)
            loss = self.peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def reset(self, system: str) -> torch.nn.Parameter:
        parameter = self.parameter(system)
        with torch.no_grad():
            parameter.copy_(self.initial.to(parameter.device))
        parameter.grad = None
        return parameter

    def run(self, variant: Variant) -> tuple[list[float], torch.Tensor]:
        """Train through every batch of the variant's plan, from the initial prompt with a fresh
        optimizer: the timed workload.

        Returns:
            The loss of every step, and the trained prompt ``(n, H)``.
        """
        from softprompt.training.optim import make_optimizer

        parameter = self.reset(variant.system)
        optimizer = make_optimizer([parameter], "adamw", self.options.lr)
        losses = [self.step(variant, batch, optimizer) for batch in self.plans[variant.grouped]]
        return losses, parameter.detach().clone()

    # ------------------------------------------------------------------ accounting
    def text_tokens(self) -> int:
        """Real text tokens of all the examples (what both sides must process)."""
        return sum(self.lengths)

    def text_width(self, variant: Variant, batch: list[int]) -> int:
        """The padded width of ``batch``'s rows behind the prompt: PEFT's input (text and label
        word), or softprompt's text rounded up to the model's length granule."""
        if variant.system == "peft":
            if variant.fixed_padding:
                return self.fixed_length
            return max(self.lengths[i] + len(self.label_ids[i]) for i in batch)
        return self.frozen.padded_length(max(self.lengths[i] for i in batch))

    def positions(self, variant: Variant) -> int:
        """Positions the model runs over all batches (prompt, padding and label word included)."""
        return sum(self._shape(variant, batch)[0] for batch in self.plans[variant.grouped])

    def flops(self, variant: Variant) -> float:
        """Analytic forward + backward FLOPs of all the batches (module docstring)."""
        params = body_linear_parameters(self.model)
        config = self.frozen.text_config
        attention = 4.0 * config.num_hidden_layers * attention_width(self.model)
        head = 2.0 * config.hidden_size * config.vocab_size if variant.system == "peft" else 0.0
        total = 0.0
        for batch in self.plans[variant.grouped]:
            positions, pairs = self._shape(variant, batch)
            total += 2 * (2.0 * params * positions) + 3 * attention * pairs + 2 * head * positions
        return total

    def _shape(self, variant: Variant, batch: list[int]) -> tuple[int, int]:
        """Positions and query-key pairs of one batch (module docstring)."""
        n, size = self.options.num_virtual_tokens, len(batch)
        width = self.text_width(variant, batch)
        if variant.shared_prefix:
            return n + size * width, n * n + size * width * (n + width)
        return size * (n + width), size * (n + width) ** 2

    def padding_fraction(self, variant: Variant) -> float:
        """Padding among the text positions the variant runs (the prompt not counted)."""
        real = padded = 0
        for batch in self.plans[variant.grouped]:
            padded += len(batch) * self.text_width(variant, batch)
            real += sum(
                self.lengths[i] + (len(self.label_ids[i]) if variant.system == "peft" else 0)
                for i in batch
            )
        return 1 - real / padded if padded else 0.0

    def same_function_difference(self) -> tuple[float, float]:
        """Max |label-word logit difference| between softprompt and PEFT at the initial prompt,
        and the largest difference that rounding in the model's dtype explains."""
        batch = self.plans[True][0]
        n = self.options.num_virtual_tokens
        with torch.no_grad():
            ours = label_scores(
                self.frozen,
                [self.train.sequences[i] for i in batch],
                self.objective.verbalizer,
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
