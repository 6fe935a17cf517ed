"""`PromptTunedModel`: a frozen transformers model with a trainable soft prompt in front.

One class serves every task type; only where the prompt goes differs:
  - CAUSAL_LM / FEATURE_EXTRACTION / SEQ_CLS: before the input tokens (see :mod:`combine`);
  - SEQ_2_SEQ_LM: before the encoder input only (as PEFT 0.21, even with two submodules).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softprompt.core.checkpoint import load_prompt, save_prompt
from softprompt.core.combine import CombinedInputs, insert_prompt
from softprompt.core.config import PromptTuningConfig, TaskType, check_prompt_width
from softprompt.core.prompt import PromptEmbedding

logger = logging.getLogger(__name__)


class PromptTunedModel(nn.Module):
    """A frozen base model plus a :class:`PromptEmbedding`, the only trainable tensor.

    Args:
        base_model: any transformers ``PreTrainedModel``; all its parameters are frozen.
        config: the prompt config; model-derived fields are filled in.
        tokenizer: optional tokenizer for TEXT/CLASS_LABEL init.
        prompt_weights: optional ``(total_virtual_tokens, token_dim)`` start values.
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: PromptTuningConfig,
        tokenizer: Any | None = None,
        prompt_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        config.fill_from_model(base_model)
        for parameter in base_model.parameters():
            parameter.requires_grad_(False)
        self.base_model = base_model
        self.peft_config = config
        embeddings = base_model.get_input_embeddings()
        self.prompt_encoder = PromptEmbedding(config, embeddings, tokenizer, weights=prompt_weights)
        self.prompt_encoder.to(embeddings.weight.device)
        if config.inference_mode:
            self.prompt_encoder.requires_grad_(False)
        self.register_buffer("prompt_tokens", torch.arange(config.total_virtual_tokens), persistent=False)
        self._forward_parameters = set(inspect.signature(base_model.forward).parameters)

    # ----------------------------------------------------------------- properties
    @property
    def word_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    @property
    def config(self) -> Any:
        """The base model's transformers config."""
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.embedding.weight.device

    @property
    def num_virtual_tokens(self) -> int:
        return self.peft_config.num_virtual_tokens

    # ----------------------------------------------------------------- prompt
    def get_prompt(self, batch_size: int) -> torch.Tensor:
        """``(batch_size, total_virtual_tokens, token_dim)`` fp32 prompt."""
        indices = self.prompt_tokens.unsqueeze(0).expand(batch_size, -1)
        return self.prompt_encoder(indices)

    @property
    def prompt(self) -> torch.Tensor:
        """``(num_virtual_tokens, token_dim)`` fp32 prompt rows (the trainable parameter itself,
        or its reparameterization during a run that sets one)."""
        return self.prompt_encoder.rows()[: self.num_virtual_tokens]

    def get_prompt_embedding_to_save(self) -> torch.Tensor:
        """``(total_virtual_tokens, token_dim)`` detached copy of the prompt, as PEFT saves it
        (a reparameterized prompt is saved folded: a plain prompt)."""
        with torch.no_grad():
            return self.prompt_encoder.rows().detach().clone()

    def set_prompt_weights(self, weights: torch.Tensor) -> None:
        """Put saved (plain) prompt rows in place, the best ones: a reparameterization is folded
        away first, so that the model holds exactly ``weights``."""
        self.prompt_encoder.fold()
        with torch.no_grad():
            self.prompt_encoder.embedding.weight.copy_(weights.to(self.device))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, the base model's included in total."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    # ----------------------------------------------------------------- forward
    def combine(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prompt: torch.Tensor | None = None,
    ) -> CombinedInputs:
        """Embed the inputs and insert the prompt before the first real token of each row.

        Args:
            input_ids: ``(B, T)`` token ids (or give ``inputs_embeds``).
            attention_mask: ``(B, T)``; None means no padding.
            inputs_embeds: ``(B, T, H)``.
            labels: ``(B, T)`` token labels, or None.
            prompt: ``(B, n, H)`` to use instead of this model's prompt (mixed-task batches).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.word_embeddings(input_ids)
        batch = inputs_embeds.shape[0]
        if prompt is None:
            prompt = self.get_prompt(batch)[:, : self.peft_config.num_virtual_tokens]
        return insert_prompt(prompt.to(inputs_embeds.dtype), inputs_embeds, attention_mask, labels)

    def _model_inputs(self, combined: CombinedInputs) -> dict[str, torch.Tensor]:
        inputs = {"inputs_embeds": combined.inputs_embeds, "attention_mask": combined.attention_mask}
        if "position_ids" in self._forward_parameters:
            inputs["position_ids"] = combined.position_ids
        return inputs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the base model with the prompt inserted; arguments as the base model's forward.

        Returns:
            The base model's output; logits have ``n + T`` positions (virtual tokens included,
            as in PEFT) except for SEQ_2_SEQ_LM, whose logits follow the decoder input.
        """
        kwargs.pop("position_ids", None)  # positions are derived from the mask (see combine)
        task = self.peft_config.task_type
        if task == TaskType.SEQ_2_SEQ_LM:
            return self._seq2seq_forward(input_ids, attention_mask, inputs_embeds, labels, **kwargs)
        token_labels = labels if task == TaskType.CAUSAL_LM else None
        combined = self.combine(input_ids, attention_mask, inputs_embeds, token_labels)
        model_inputs = self._model_inputs(combined)
        token_type_ids = kwargs.pop("token_type_ids", None)
        if token_type_ids is not None:
            zeros = torch.zeros_like(token_type_ids[:, :1]).expand(-1, self.num_virtual_tokens)
            model_inputs["token_type_ids"] = torch.cat([zeros, token_type_ids], 1).gather(1, combined.source_index)
        if task == TaskType.CAUSAL_LM:
            model_inputs["labels"] = combined.labels
        elif labels is not None:
            model_inputs["labels"] = labels
        return self.base_model(**model_inputs, **kwargs)

    def _seq2seq_forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        labels: torch.Tensor | None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        combined = self.combine(input_ids, attention_mask, inputs_embeds)
        # As PEFT 0.21 does for PROMPT_TUNING: only the encoder input gets the prompt, whatever
        # num_transformer_submodules says (with 2, the decoder rows are stored but never used),
        # and the decoder inputs, decoder mask and labels go to the model unchanged.
        return self.base_model(
            inputs_embeds=combined.inputs_embeds,
            attention_mask=combined.attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            labels=labels,
            **kwargs,
        )

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Generate with the prompt computed once into the KV cache during prefill.

        Args:
            input_ids: ``(B, T)``; use left padding for batched causal generation.
            attention_mask: ``(B, T)``.
            **generate_kwargs: passed to the base model's ``generate``.

        Returns:
            Causal LM: ``(B, T + new)`` the inputs followed by the new tokens (no virtual tokens).
            Seq2seq: the decoder's output ids.
        """
        combined = self.combine(input_ids, attention_mask)
        output = self.base_model.generate(
            inputs_embeds=combined.inputs_embeds, attention_mask=combined.attention_mask, **generate_kwargs
        )
        if self.peft_config.task_type == TaskType.SEQ_2_SEQ_LM:
            return output
        return torch.cat([input_ids, output.to(input_ids.device)], dim=1)

    # ----------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write a PEFT-format checkpoint (plus ``softprompt.json``) atomically."""
        meta = {"init_report": self.prompt_encoder.init_report.to_dict(), **(metadata or {})}
        extra = _classifier_tensors(self.base_model) if self.peft_config.task_type == TaskType.SEQ_CLS else None
        return save_prompt(directory, self.get_prompt_embedding_to_save(), self.peft_config, meta, extra)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        directory: str | Path,
        is_trainable: bool = False,
    ) -> PromptTunedModel:
        """Load a prompt saved by softprompt or PEFT onto ``model``.

        Args:
            model: the frozen base model.
            directory: the checkpoint directory.
            is_trainable: keep the prompt trainable to continue training (PEFT cannot).

        Raises:
            ValueError: a prefix checkpoint, or one tuned for a model of another width.
        """
        checkpoint = load_prompt(directory)
        if not isinstance(checkpoint.config, PromptTuningConfig):  # its width would be misread
            raise ValueError(
                f"{directory}: a prefix (PREFIX_TUNING) checkpoint; PromptTunedModel loads "
                "PROMPT_TUNING ones (serve a prefix with the Engine, eval or predict)"
            )
        check_prompt_width(
            checkpoint.weights.shape[1], model.get_input_embeddings().weight.shape[1],
            str(directory), checkpoint.config.base_model_name_or_path,
        )
        _check_extra_tensors(model, checkpoint.extra_tensors, directory)
        config = checkpoint.config
        config.inference_mode = not is_trainable
        prompt_model = cls(model, config, prompt_weights=checkpoint.weights)
        prompt_model.metadata = checkpoint.metadata
        if not is_trainable:
            prompt_model.eval()  # as PEFT: loaded for inference means no dropout
        return prompt_model


# PeftModelForSequenceClassification always adds these to modules_to_save and fails to load a
# checkpoint without their weights.
_PEFT_CLASSIFIER_NAMES = ("classifier", "score")


def _classifier_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The classification head's tensors under the keys PEFT saves its ``modules_to_save`` with."""
    tensors: dict[str, torch.Tensor] = {}
    matched: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(parent + ".") for parent in matched):
            continue
        if any(name == target or name.endswith("." + target) for target in _PEFT_CLASSIFIER_NAMES):
            matched.append(name)
            for key, value in module.state_dict().items():
                tensors[f"base_model.{name}.{key}"] = value
    return tensors


def _check_extra_tensors(model: nn.Module, extra: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Refuse a PEFT checkpoint whose ``modules_to_save`` weights differ from the model's own.

    PEFT saves e.g. the classification head of a SEQ_CLS model (trained with the prompt) beside
    the prompt, as ``base_model.<parameter name>``. softprompt keeps the whole base model frozen and
    does not apply them: loading only the prompt would silently give other results, so this is
    only accepted when those weights are the model's own.
    """
    if not extra:
        return
    own = dict(model.state_dict(keep_vars=True))
    differing = []
    for key, tensor in sorted(extra.items()):
        parameter = own.get(key.removeprefix("base_model."))
        if (
            parameter is None
            or parameter.shape != tensor.shape
            or not torch.equal(parameter.detach().to("cpu", torch.float32), tensor.to(torch.float32))
        ):
            differing.append(key)
    if differing:
        raise ValueError(
            f"{Path(directory) / 'adapter_model.safetensors'}: besides the prompt it holds "
            f"{', '.join(differing)} (PEFT's modules_to_save, e.g. a trained classification head), "
            "which differ from the model's own weights; softprompt keeps the base model frozen and "
            "loads only the prompt. Copy those weights into the model first, or load it with PEFT."
        )


def get_prompt_model(
    model: nn.Module, config: PromptTuningConfig, tokenizer: Any | None = None
) -> PromptTunedModel:
    """Freeze ``model`` and put a new soft prompt in front of it (PEFT's ``get_peft_model``)."""
    return PromptTunedModel(model, config, tokenizer=tokenizer)
