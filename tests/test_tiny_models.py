"""The tiny offline models: deterministic, cached, atomic, loadable, and small enough for CPU tests."""

from __future__ import annotations

import hashlib
import json
import pathlib
import threading

import pytest
import torch

from actors import tiny_models
from actors.engine import ChatRequest
from actors.engines.processing import image_inputs, load_processor, render_prompt

SCREENSHOT = pathlib.Path(__file__).parent / "data" / "miniwob_click_button.png"


def _digest(folder: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_builds_are_deterministic_and_cached(tmp_path: pathlib.Path) -> None:
    a = tiny_models.build_tiny_text_model(tmp_path / "a")
    b = tiny_models.build_tiny_text_model(tmp_path / "b")
    assert a.name == b.name  # same content hash
    assert _digest(a) == _digest(b)  # byte-identical weights, tokenizer, configs
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert tiny_models.build_tiny_text_model(tmp_path / "a") == a
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime  # served from the cache, not rebuilt


def test_parallel_builders_share_one_folder(tmp_path: pathlib.Path) -> None:
    results: list[pathlib.Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(tiny_models.build_tiny_vl_model(tmp_path))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(set(results)) == 1
    # Only the finished model is left: no temporary build folders.
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]


def test_cache_dir_env_override(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BGRPO_CACHE_DIR", str(tmp_path))
    path = tiny_models.build_tiny_text_model()
    assert path.parent == tmp_path / "tiny-models"


def test_text_model_loads_and_generates(tiny_text_model: pathlib.Path) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = load_processor(tiny_text_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_text_model)
    assert model.config.vocab_size == len(tokenizer)  # every sampled id decodes
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, like Qwen3-VL-2B
    prompt = render_prompt(tokenizer, ChatRequest(messages=[{"role": "user", "content": "click('13')"}]))
    text = tokenizer.decode(prompt.prompt_ids)
    assert text == "<|im_start|>user\nclick('13')<|im_end|>\n<|im_start|>assistant\n"
    out = model.generate(torch.tensor([prompt.prompt_ids]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] == len(prompt.prompt_ids) + 5 or tokenizer.eos_token_id in out[0].tolist()


def test_vl_model_config_constraints(tiny_vl_model: pathlib.Path) -> None:
    config = json.loads((tiny_vl_model / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert sum(text["rope_parameters"]["mrope_section"]) == text["head_dim"] // 2
    assert max(vision["deepstack_visual_indexes"]) < vision["depth"]
    assert vision["out_hidden_size"] == text["hidden_size"]
    # vLLM builds Qwen3VLProcessor with a video processor, which needs this file.
    assert (tiny_vl_model / "video_preprocessor_config.json").exists()


def test_vl_model_takes_a_real_screenshot(tiny_vl_model: pathlib.Path) -> None:
    from transformers import AutoModelForImageTextToText

    from actors.engines.processing import mm_token_type_ids

    processor = load_processor(tiny_vl_model)
    assert not hasattr(processor, "video_processor") or processor.video_processor is None
    request = ChatRequest(
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Click Ok."}]}],
        images=[SCREENSHOT.read_bytes()],
    )
    prompt = render_prompt(processor, request)
    n_image_tokens = prompt.prompt_ids.count(processor.image_token_id)
    # 498x321 screenshot -> at most max_pixels / (32x32) merged tokens: fast on CPU.
    assert 2 <= n_image_tokens <= tiny_models.IMAGE_MAX_PIXELS // (32 * 32)
    t, h, w = prompt.image_grid_thw[0].tolist()
    assert t * h * w // 4 == n_image_tokens
    # The learner's path from stored PNG bytes gives the same pixels as the engine's.
    again = image_inputs(processor, request.images)
    assert torch.equal(again["pixel_values"], prompt.pixel_values)

    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_model).eval()
    ids = torch.tensor([prompt.prompt_ids])
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            pixel_values=prompt.pixel_values,
            image_grid_thw=prompt.image_grid_thw,
            mm_token_type_ids=mm_token_type_ids(ids, model.config.image_token_id),
        ).logits
    assert logits.shape == (1, len(prompt.prompt_ids), model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_cli_builds_both(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    assert tiny_models.main(["--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny-qwen3-" in out and "tiny-qwen3-vl-" in out
    assert len(list(tmp_path.iterdir())) == 2
