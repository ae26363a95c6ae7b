"""transformers backend: batched `generate` with left padding. The CPU-test engine and the GPU fallback.

Reports the same fields as the vLLM backend, with the same definitions: prompt ids rendered once by
`processing.render_prompt`; completion ids up to and including the EOS token (padding stripped);
the logprob of each sampled token under the distribution it was sampled from (temperature, top-k,
top-p applied; raw log-softmax when greedy), which is what vLLM reports with
``logprobs_mode="processed_logprobs"``.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Mapping, Sequence

import torch

from actors.engine import ChatRequest, Generation, InferenceEngine, SamplingSettings
from actors.engines.config import EngineConfig, resolve_max_model_len
from actors.engines.processing import (
    load_processor,
    mm_token_type_ids,
    model_config,
    render_requests,
    tokenizer_of,
)
from actors.engines.update_gate import UpdateTiming
from actors.engines.weights import hf_parameter_shapes, validate_update


def _torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def finish_completion(
    token_ids: Sequence[int], eos_ids: set[int], stop: Sequence[str], limit: int, tokenizer
) -> tuple[int, str]:
    """How many of the generated tokens belong to the completion, and why it ended.

    The completion ends at the first EOS (kept, like vLLM), at the first token whose text completes
    a stop string, or at `limit` tokens ("length"); anything after is batch padding.
    """
    for t, token in enumerate(token_ids[:limit]):
        if token in eos_ids:
            return t + 1, "stop"
        if stop:
            text = tokenizer.decode(token_ids[: t + 1], skip_special_tokens=True)
            if any(s in text for s in stop):
                return t + 1, "stop"
    return min(limit, len(token_ids)), "length"


class HFEngine(InferenceEngine):
    """`InferenceEngine` on transformers `generate` (one model, in this process)."""

    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

        config.validate()
        self.config = config
        if config.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(config.device)
        self.dtype = _torch_dtype(config.dtype, self.device)
        self._max_model_len = resolve_max_model_len(config, model_config(config.model))
        self.processor = load_processor(config.model)
        self.tokenizer = tokenizer_of(self.processor)
        self.is_vision_language = hasattr(self.processor, "image_processor")
        auto = AutoModelForImageTextToText if self.is_vision_language else AutoModelForCausalLM
        self.model = auto.from_pretrained(config.model, dtype=self.dtype).to(self.device).eval()
        self._expected_shapes = hf_parameter_shapes(config.model)
        self._tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        gen = GenerationConfig.from_pretrained(config.model)
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.image_token_id = getattr(self.model.config, "image_token_id", None)
        self._version = 0
        self._asleep = False
        # generate and update_weights never interleave, even from a threaded Ray actor.
        self._lock = threading.Lock()
        self._update_timing = UpdateTiming("drained")

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def max_model_len(self) -> int:
        """Context length: prompt + completion tokens."""
        return self._max_model_len

    def generate(self, requests: Sequence[ChatRequest], sampling: SamplingSettings) -> list[Generation]:
        self._refuse_if_asleep()
        rendered = render_requests(self.processor, requests, sampling, self.max_model_len)
        if not rendered:
            return []

        with self._lock:
            version = self._version
            inputs, width = self._batch_inputs(rendered)
            # --- sample ---
            limits = [min(sampling.max_new_tokens, self.max_model_len - len(r.prompt_ids)) for r in rendered]
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            with torch.no_grad():
                out = self.model.generate(
                    **inputs, generation_config=self._generation_config(sampling, max(limits)),
                    tokenizer=self.tokenizer if sampling.stop else None,
                )
            new_tokens = out.sequences[:, width:].cpu()
            # [steps, batch, vocab] -> logprob of the sampled token at each step
            scores = torch.stack(out.scores, dim=1).float().cpu()
            token_logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)

        # --- strip padding after EOS / stop string, decode ---
        generations = []
        for i, r in enumerate(rendered):
            ids = new_tokens[i].tolist()
            n, reason = finish_completion(ids, self.eos_ids, sampling.stop, limits[i], self.tokenizer)
            completion = ids[:n]
            generations.append(
                Generation(
                    prompt_ids=r.prompt_ids,
                    completion_ids=completion,
                    logprobs=token_logprobs[i, :n].tolist(),
                    text=self.tokenizer.decode(completion, skip_special_tokens=True),
                    finish_reason=reason,
                    policy_version=version,
                    temperature=sampling.temperature,
                    top_k=sampling.top_k if sampling.top_k > 0 and not sampling.greedy else -1,
                    top_p=sampling.top_p if not sampling.greedy else 1.0,
                )
            )
        return generations

    def _batch_inputs(self, rendered: list) -> tuple[dict[str, torch.Tensor], int]:
        """The model inputs of the rendered prompts on the device, left-padded so every prompt
        ends where generation starts, and the padded width."""
        width = max(len(r.prompt_ids) for r in rendered)
        input_ids = torch.full((len(rendered), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rendered), width), dtype=torch.long)
        for i, r in enumerate(rendered):
            input_ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            attention_mask[i, width - len(r.prompt_ids) :] = 1
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        with_images = [r for r in rendered if r.pixel_values is not None]
        if with_images:
            inputs["pixel_values"] = torch.cat([r.pixel_values for r in with_images]).to(self.device, self.dtype)
            inputs["image_grid_thw"] = torch.cat([r.image_grid_thw for r in with_images]).to(self.device)
        if self.image_token_id is not None:
            inputs["mm_token_type_ids"] = mm_token_type_ids(input_ids, self.image_token_id).to(self.device)
        return inputs, width

    def _generation_config(self, sampling: SamplingSettings, max_new_tokens: int) -> Any:
        """transformers' GenerationConfig for `sampling`, returning the processed scores
        (temperature/top-k/top-p applied) the logprobs are read from."""
        from transformers import GenerationConfig

        return GenerationConfig(
            do_sample=not sampling.greedy,
            temperature=sampling.temperature if not sampling.greedy else None,
            top_k=sampling.top_k if sampling.top_k > 0 and not sampling.greedy else 0,
            top_p=sampling.top_p if not sampling.greedy else None,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id,
            stop_strings=list(sampling.stop) or None,
            return_dict_in_generate=True,
            output_scores=True,  # processed scores: temperature/top-k/top-p applied
        )

    def update_weights(self, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        validate_update(version, weights, self._expected_shapes, self._tied)
        arrived = time.monotonic()
        with self._lock, torch.no_grad():
            started = time.monotonic()
            state = self.model.state_dict()  # shares storage with the parameters
            for name, tensor in weights.items():
                state[name].copy_(tensor.to(device=self.device, dtype=state[name].dtype))
            self._version = version
            # Always drained here: the load holds the engine between generate calls.
            self._update_timing.record(time.monotonic() - started, started - arrived, mid_call=False)

    def sleep(self) -> None:
        """On a GPU: the model moves to CPU memory and the cached GPU memory is released (updates
        still load, into the CPU copy); on CPU there is nothing to free."""
        with self._lock:
            if self.device.type == "cuda" and not self._asleep:
                self.model.to("cpu")
                torch.cuda.empty_cache()
            self._asleep = True

    def wake_up(self) -> None:
        with self._lock:
            if self.device.type == "cuda" and self._asleep:
                self.model.to(self.device)
            self._asleep = False

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
