"""Engine pieces without an engine: update validation, completion trimming, request checks, config, plugin."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from actors.engine import ChatRequest, EngineError
from actors.engines.config import EngineConfig
from actors.engines.hf_engine import finish_completion
from actors.engines.processing import load_image, load_processor, render_prompt
from actors.engines.weights import hf_parameter_shapes, validate_update

EXPECTED = {
    "model.layers.0.self_attn.q_proj.weight": (4, 2),
    "model.layers.0.self_attn.k_proj.weight": (2, 2),
    "model.layers.0.self_attn.v_proj.weight": (2, 2),
    "model.layers.0.mlp.gate_proj.weight": (3, 2),
    "model.layers.0.mlp.up_proj.weight": (3, 2),
    "model.visual.blocks.0.attn.qkv.weight": (6, 2),
    "model.visual.blocks.0.attn.qkv.bias": (6,),
    "model.norm.weight": (2,),
}


def _full() -> dict[str, torch.Tensor]:
    return {n: torch.zeros(s) for n, s in EXPECTED.items()}


def test_validate_update_accepts_whole_modules() -> None:
    validate_update(1, _full(), EXPECTED)
    validate_update(2, {"model.norm.weight": torch.ones(2, dtype=torch.bfloat16)}, EXPECTED)


@pytest.mark.parametrize(
    "weights,message",
    [
        ({"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 2)}, "update together"),
        ({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 2)}, "gate_proj.weight missing"),
        ({"model.visual.blocks.0.attn.qkv.weight": torch.zeros(6, 2)}, "qkv.bias missing"),
        ({"model.norm.weight": torch.zeros(3)}, "shape"),
        ({"model.norm.weigth": torch.zeros(2)}, "unknown parameter 'model.norm.weigth'"),
        ({"model.norm.weight": [0.0, 0.0]}, "torch.Tensor"),
        ({}, "empty"),
    ],
)
def test_validate_update_refuses(weights: dict, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        validate_update(1, weights, EXPECTED)


@pytest.mark.parametrize("version", [-1, 1.5, True, "2"])
def test_validate_update_refuses_bad_versions(version) -> None:
    with pytest.raises(EngineError, match="version"):
        validate_update(version, _full(), EXPECTED)


def test_tied_embeddings_must_agree() -> None:
    expected = {"model.embed_tokens.weight": (3, 2), "lm_head.weight": (3, 2)}
    same = torch.randn(3, 2)
    validate_update(1, {"model.embed_tokens.weight": same, "lm_head.weight": same.clone()}, expected, True)
    with pytest.raises(EngineError, match="ties"):
        validate_update(1, {"model.embed_tokens.weight": same, "lm_head.weight": same + 1}, expected, True)
    validate_update(1, {"model.embed_tokens.weight": same, "lm_head.weight": same + 1}, expected, False)


def test_hf_parameter_shapes_match_the_real_model(tiny_vl_model) -> None:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_model)
    assert hf_parameter_shapes(tiny_vl_model) == {n: tuple(t.shape) for n, t in model.state_dict().items()}


class _ByteTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i >= 32)


@pytest.mark.parametrize(
    "tokens,stop,limit,expected",
    [
        ([97, 98, 2, 0, 0], [], 10, (3, "stop")),  # EOS kept, padding after it dropped
        ([97, 98, 99, 100], [], 3, (3, "length")),  # per-request limit in a longer batch
        ([97, 98, 99, 100], ["bc"], 10, (3, "stop")),  # ends at the token completing the stop string
        ([97, 98, 99], [], 10, (3, "length")),
    ],
)
def test_finish_completion(tokens, stop, limit, expected) -> None:
    assert finish_completion(tokens, {2}, stop, limit, _ByteTokenizer()) == expected


def test_load_image_errors() -> None:
    from PIL import Image

    assert load_image(Image.new("L", (4, 4))).mode == "RGB"
    with pytest.raises(EngineError, match="not a decodable"):
        load_image(b"GIF89a-nope")
    with pytest.raises(EngineError, match="PIL.Image or PNG"):
        load_image("screenshot.png")


def test_render_prompt_request_errors(tiny_text_model) -> None:
    tokenizer = load_processor(tiny_text_model)
    bad = [
        (ChatRequest(messages=[]), "no messages"),
        (ChatRequest(messages=[{"content": "hi"}]), "'role' and 'content'"),
        (ChatRequest(messages=[{"role": "user", "content": 3}]), "str or a list"),
        (ChatRequest(messages=[{"role": "user", "content": "hi"}], images=[b"x"]), "0 image part"),
    ]
    for request, message in bad:
        with pytest.raises(EngineError, match=message):
            render_prompt(tokenizer, request)


def test_engine_config_validate() -> None:
    EngineConfig(model="/m").validate()
    for kwargs, message in [
        ({}, "engine.model"),
        ({"model": "/m", "backend": "sglang"}, "backend"),
        ({"model": "/m", "dtype": "int8"}, "dtype"),
        ({"model": "/m", "device": "tpu"}, "device"),
        ({"model": "/m", "max_model_len": 0}, "max_model_len"),
        ({"model": "/m", "gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ]:
        with pytest.raises(ValueError, match=message):
            EngineConfig(**kwargs).validate()


def test_resolve_max_model_len() -> None:
    from actors.engines.config import resolve_max_model_len

    vl = {"text_config": {"max_position_embeddings": 2048}}
    assert resolve_max_model_len(EngineConfig(model="/m"), vl) == 2048
    assert resolve_max_model_len(EngineConfig(model="/m", max_model_len=256), vl) == 256
    with pytest.raises(ValueError, match="exceeds the model's limit of 2048"):
        resolve_max_model_len(EngineConfig(model="/m", max_model_len=4096), vl)


def test_vllm_plugin_makes_qwen3_vl_importable_and_is_idempotent() -> None:
    from actors.engines import vllm_plugin

    vllm_plugin.register()
    vllm_plugin.register()  # vLLM may call it more than once per process
    module = sys.modules["transformers.models.qwen2_vl.image_processing_qwen2_vl"]
    assert hasattr(module, "smart_resize")
    import transformers.models.qwen3_vl as qwen3_vl
    from transformers.video_processing_utils import BaseVideoProcessor

    assert issubclass(qwen3_vl.Qwen3VLVideoProcessor, BaseVideoProcessor)


def test_sleep_mode_is_cuda_only_and_a_sleeping_engine_refuses_to_generate(tiny_text_model) -> None:
    """vLLM's sleep mode needs CUDA: on CPU the engine refuses it before starting vLLM. The
    transformers engine sleeps anywhere (on CPU nothing to free) and refuses to generate until
    woken, then generates as before."""
    from actors.engine import SamplingSettings
    from actors.engines import create_engine
    from actors.engines.vllm_engine import _llm_kwargs

    cfg = EngineConfig(model=str(tiny_text_model), backend="vllm", enable_sleep_mode=True)
    with pytest.raises(EngineError, match="CUDA-only"):
        _llm_kwargs(cfg, vision_language=False, on_cpu=True, max_model_len=256)
    assert _llm_kwargs(cfg, vision_language=False, on_cpu=False, max_model_len=256)["enable_sleep_mode"]

    engine = create_engine(EngineConfig(model=str(tiny_text_model), backend="transformers", device="cpu"))
    try:
        request = [ChatRequest(messages=[{"role": "user", "content": "click the button"}])]
        greedy = SamplingSettings(temperature=0.0, max_new_tokens=6)
        before = engine.generate(request, greedy)[0].completion_ids
        engine.sleep()
        with pytest.raises(EngineError, match="asleep"):
            engine.generate(request, greedy)
        engine.wake_up()
        assert engine.generate(request, greedy)[0].completion_ids == before
    finally:
        engine.close()


@pytest.mark.parametrize("pixel_limits", ["tiny", "qwen3-vl-2b"])
def test_size_based_image_expansion_equals_the_processor(tiny_vl_model, pixel_limits) -> None:
    """The vLLM engine renders without pixels (render_prompt(pixels=False)): its prompt ids must be
    exactly the processor's, for screenshots of every size and both pixel limits."""
    from PIL import Image

    from actors.tiny_models import QWEN3_VL_2B_PIXELS

    processor = load_processor(tiny_vl_model)
    if pixel_limits == "qwen3-vl-2b":
        processor.image_processor.size = {"shortest_edge": QWEN3_VL_2B_PIXELS["min_pixels"],
                                          "longest_edge": QWEN3_VL_2B_PIXELS["max_pixels"]}
    content = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}, {"type": "text", "text": "act"}]
    counts = set()
    for size in [(498, 321), (160, 210), (1280, 720), (33, 1000), (64, 64)]:
        images = [Image.new("RGB", size, (10, 20, 30)), Image.new("RGB", (size[1], size[0]), (1, 2, 3))]
        request = ChatRequest(messages=[{"role": "user", "content": content}], images=images)
        full = render_prompt(processor, request)
        fast = render_prompt(processor, request, pixels=False)
        assert fast.prompt_ids == full.prompt_ids, size
        assert fast.placeholder_ids == full.placeholder_ids
        assert fast.pixel_values is None and full.pixel_values is not None
        counts.add(full.prompt_ids.count(processor.image_token_id))
    assert len(counts) > 2  # the sizes really change the expansion


def test_size_based_expansion_refuses_unpaired_placeholders(tiny_vl_model) -> None:
    from PIL import Image

    from actors.engines.processing import expand_image_tokens

    processor = load_processor(tiny_vl_model)
    with pytest.raises(EngineError, match="1 image placeholder"):
        expand_image_tokens(processor, [processor.image_token_id], [Image.new("RGB", (50, 50))] * 2)


def test_cuda_graphs_are_captured_only_up_to_the_batches_an_engine_runs(monkeypatch, tmp_path):
    # vLLM's own default captures graphs up to 2 x max_num_seqs (at most 512): start-up time spent on
    # batches the engine can never run. Eager engines and CPU engines capture nothing.
    from actors.engines.vllm_engine import _llm_kwargs

    cfg = EngineConfig(model="m", backend="vllm", max_num_seqs=24, enforce_eager=False)
    assert _llm_kwargs(cfg, False, on_cpu=False, max_model_len=256)["compilation_config"] == {
        "max_cudagraph_capture_size": 24}
    cfg.cudagraph_max_batch = 8
    assert _llm_kwargs(cfg, False, on_cpu=False, max_model_len=256)["compilation_config"] == {
        "max_cudagraph_capture_size": 8}
    assert "compilation_config" not in _llm_kwargs(cfg, False, on_cpu=True, max_model_len=256)
    cfg.enforce_eager = True
    assert "compilation_config" not in _llm_kwargs(cfg, False, on_cpu=False, max_model_len=256)
    with pytest.raises(ValueError, match="cudagraph_max_batch"):
        EngineConfig(model="m", cudagraph_max_batch=0).validate()


def test_compile_cache_folder_holds_vllms_inductors_and_tritons_caches(monkeypatch, tmp_path):
    from actors.engines.vllm_engine import _use_compile_cache

    for var in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/users/own/triton")  # a variable the user set wins
    _use_compile_cache(str(tmp_path / "cc"))
    assert os.environ["VLLM_CACHE_ROOT"] == str(tmp_path / "cc" / "vllm")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cc" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == "/users/own/triton"
    monkeypatch.delenv("VLLM_CACHE_ROOT")
    _use_compile_cache("")  # "": the libraries' own defaults
    assert "VLLM_CACHE_ROOT" not in os.environ
