"""One vLLM generate call driven step by step, so that weight updates can land in the middle of it
(`engine.weight_update: in_flight`; actors/engines/update_gate.py has the two modes).

Without an update this is `LLM.generate`: the same requests, rendered the same way
(`_engine_input`), added in the same order and stepped until none is left, so the same token ids
and logprobs (a test checks it against `LLM.generate` with the same seeds).

When an update is posted, at the next step boundary every unfinished request is aborted, the
update is loaded (caches reset), and each request is added again with its prompt followed by the
tokens it has so far, asking only for the tokens it still may generate: it is re-prefilled under
the new weights and continues. The tokens received before the abort carry the old version, those
after it the new one. Why re-prefill rather than keep the KV cache computed under the old
weights (PipelineRL's way, which saves the re-prefill):

- exact stamps with vLLM's engine core in its own process. The core steps on its own, ahead of
  the outputs this process has read, and with async scheduling a batch can be in flight while a
  weight load is queued; so "between two `step()` calls here" is not a step boundary of the core,
  and a token read just after the load may have been computed before it. Only a per-output weight
  version from the core (vLLM 0.32 has `EngineCoreOutputs.weight_version`; not relied on, the
  GPU build is 0.24) could tell. After an abort nothing old can arrive for a resumed request: the
  aborted request's late outputs are dropped by vLLM's output processor (unknown request id), and
  the resumed request is added only after the load has returned;
- exact logprobs: every token after the switch is sampled from, and its logprob is that of, the
  new policy on the whole context (no KV from the old weights), which a teacher-forced pass of the
  new weights reproduces (tests/test_inflight_updates.py). With kept KV the distribution sampled
  from is neither policy's, which is correct for importance sampling (the recorded logprob is
  still the behaviour's) but not checkable against either model;
- the prefix cache must be emptied at a load (its blocks hold old-weight KV), and vLLM refuses
  that while running requests hold blocks; after the abort none does.

The cost: a prefill of prompt + tokens so far for each request running at the switch, counted in
`weight_update_reprefill_tokens`. A resumed request gets a new seed (`seed + RESEED * k` for its
k-th resume) so it does not replay the random stream of its start; sampling seeds are off in
training anyway. A stop string that straddles the switch is found by `trim_stop` on the whole
completion.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from actors.engine import EngineError

RESEED = 1_000_003
_request_ids = itertools.count()


def _engine_input(llm: Any, prompt: dict[str, Any]) -> Any:
    """The prompt as `LLMEngine.add_request` takes it. vLLM 0.32's `LLM.generate` renders each
    prompt first (`_preprocess_cmpl_one`) and warns that raw prompts to `add_request` are
    deprecated; older versions (0.24) take the raw prompt dict. Every vLLM version difference of
    this module is here."""
    render = getattr(llm, "_preprocess_cmpl_one", None)
    return render(prompt) if render is not None else prompt


@dataclass
class _Request:
    """One request of the call: the tokens so far, each with the version that sampled it."""

    index: int
    prompt: dict[str, Any]
    params: Any
    version: int
    request_id: str = ""
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    seg_ids: list[int] = field(default_factory=list)  # the current vLLM request's tokens
    seg_logprobs: list[float] = field(default_factory=list)
    prompt_token_ids: list[int] | None = None  # what vLLM ran on, from the first segment
    finish_reason: str | None = None
    resumes: int = 0

    def take(self, out: Any) -> None:
        """A cumulative output of the current segment."""
        if self.prompt_token_ids is None:
            self.prompt_token_ids = list(out.prompt_token_ids)
        completion = out.outputs[0]
        self.seg_ids = list(completion.token_ids)
        self.seg_logprobs = [float(step[t].logprob) for t, step in zip(self.seg_ids, completion.logprobs or [])]
        if len(self.seg_logprobs) != len(self.seg_ids):
            raise EngineError(f"vLLM returned {len(self.seg_logprobs)} logprobs for {len(self.seg_ids)} tokens")
        if out.finished:
            self.close_segment()
            self.finish_reason = "length" if completion.finish_reason == "length" else "stop"

    def close_segment(self) -> None:
        self.ids += self.seg_ids
        self.logprobs += self.seg_logprobs
        self.versions += [self.version] * len(self.seg_ids)
        self.seg_ids, self.seg_logprobs = [], []


class SteppedGeneration:
    """Runs one batch on `llm.llm_engine` (the caller holds the engine lock), applying posted
    updates between steps through `gate` (an `UpdateGate`); `version()` is the engine's version."""

    def __init__(self, llm: Any, gate: Any, version: Callable[[], int]) -> None:
        self.llm = llm
        self.engine = llm.llm_engine
        self.gate = gate
        self.version = version
        self.requests: list[_Request] = []

    def tokens_so_far(self) -> list[int]:
        """Tokens each request has received so far (tests and benchmarks watch a running call)."""
        return [len(r.ids) + len(r.seg_ids) for r in self.requests]

    def run(self, prompts: list[dict[str, Any]], params: list[Any]) -> list[_Request]:
        v = self.version()
        self.requests = [_Request(i, p, sp, v) for i, (p, sp) in enumerate(zip(prompts, params))]
        by_id: dict[str, _Request] = {}
        try:
            for r in self.requests:
                self._add(r, r.prompt, r.params, by_id)
            while self.engine.has_unfinished_requests():
                if self.gate.mode == "in_flight" and self.gate.pending():
                    self._switch(by_id)
                    continue  # a step with nothing left to run would wait for output forever
                for out in self.engine.step():
                    r = by_id.get(out.request_id)
                    if r is not None:
                        r.take(out)
        except BaseException:
            self._abort([r for r in self.requests if r.finish_reason is None])
            raise
        return self.requests

    def _add(self, r: _Request, prompt: dict[str, Any], params: Any, by_id: dict[str, _Request]) -> None:
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.CUMULATIVE  # the tokens so far, at every step
        r.request_id = f"bgrpo-{next(_request_ids)}"
        by_id[r.request_id] = r
        try:
            self.engine.add_request(r.request_id, _engine_input(self.llm, prompt), params)
        except (ValueError, TypeError) as err:  # vLLM's input validation
            raise EngineError(f"vLLM refused request {r.index}: {err}") from err

    def _abort(self, running: list[_Request]) -> None:
        if running:
            self.engine.abort_request([r.request_id for r in running])

    def _switch(self, by_id: dict[str, _Request]) -> None:
        """Pauses the unfinished requests, runs the posted updates, resumes the requests."""
        paused = time.monotonic()
        running = [r for r in self.requests if r.finish_reason is None]
        self._abort(running)
        by_id.clear()
        for r in running:
            r.close_segment()
        jobs = self.gate.run_posted()
        v = self.version()
        reprefill = 0
        for r in running:
            r.version = v
            reprefill += self._resume(r, by_id)
        idle = time.monotonic() - paused
        for job in jobs:  # a failed load (its thread gets the error) still cost the pause
            self.gate.timing.record(idle / len(jobs), job.started - job.arrived, mid_call=True,
                                    reprefill_tokens=reprefill // len(jobs))

    def _resume(self, r: _Request, by_id: dict[str, _Request]) -> int:
        """Adds `r` again: its prompt + its tokens so far, for the tokens it may still generate.
        Returns the tokens to prefill again (0 if it had none left to generate)."""
        left = r.params.max_tokens - len(r.ids)
        if left <= 0:
            r.finish_reason = "length"
            return 0
        r.resumes += 1
        params = r.params.clone()
        params.max_tokens = left
        if params.seed is not None:
            params.seed = r.params.seed + RESEED * r.resumes
        prompt = dict(r.prompt, prompt_token_ids=list(r.prompt["prompt_token_ids"]) + r.ids)
        self._add(r, prompt, params, by_id)
        return len(r.prompt_token_ids or prompt["prompt_token_ids"]) + len(r.ids)


def trim_stop(ids: list[int], stop: list[str], tokenizer: Any) -> tuple[int, bool]:
    """How many tokens to keep, and whether a stop string ended the completion: vLLM checks stop
    strings per request, so one that straddles a resume is only found on the whole completion."""
    if not stop:
        return len(ids), False
    for t in range(len(ids)):
        text = tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
        if any(s in text for s in stop):
            return t + 1, True
    return len(ids), False
