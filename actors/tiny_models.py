"""Tiny random-initialised Qwen3 / Qwen3-VL models, built offline in seconds for tests and the local preset.

Both are real Hugging Face checkpoints (config, safetensors, tokenizer, chat template, generation
config; for the VLM also the image and video processor configs vLLM expects), loadable with
`from_pretrained` by transformers and by vLLM. They differ from the real models only in size and in
the tokenizer, a byte-level BPE trained here on a small generated corpus of agent-like text.

Builds are deterministic (fixed seeds) and cached under a hash of everything that defines them:
``$BGRPO_CACHE_DIR/tiny-models/<name>-<hash>`` (default ``~/.cache/bgrpo/tiny-models``). A build
writes into a temporary folder and renames it into place, so parallel builders (pytest-xdist, Ray
actors) never see a half-written model.

    bgrpo build-tiny-models [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import random
import shutil
import tempfile
from typing import Any

# Bump when the build procedure changes in a way the spec below does not capture.
_BUILD_VERSION = 1

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
BPE_VOCAB_SIZE = 640  # including the special tokens; small so the embedding stays tiny

# Qwen-style ChatML template that also renders image parts ({"type": "image"}) as the Qwen-VL vision
# placeholder; the processor expands <|image_pad|> to one token per merged image patch. Expressions
# (not literal newlines) so Jinja whitespace control cannot eat the newlines.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Text decoder shared by both models. head_dim 32: the smallest head size vLLM's CPU attention
# supports. initializer_range 0.2 (not 0.02) so the random policy is peaked rather than uniform
# over the vocabulary: greedy output then reacts visibly to weight changes, and a tiny model can
# reach a rewarded token (with 0.02 and this 640-token vocabulary every token is near 1/640, so a
# reward that needs one particular token is practically never sampled).
TEXT_SPEC: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "initializer_range": 0.2,
    "tie_word_embeddings": True,
}

# Vision tower: patch 16 with 2x2 merge (Qwen3-VL's real values) and a small pixel budget, so a
# MiniWoB screenshot (~160x210) becomes at most 16 image tokens.
VISION_SPEC: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 64,  # an 8x8 grid of learned positions, interpolated per image
    "deepstack_visual_indexes": [0],  # must be < depth
    "initializer_range": 0.2,
}
# mrope_section must sum to head_dim / 2 (t, h, w rotary frequencies).
MROPE_SECTION = [6, 5, 5]
IMAGE_MIN_PIXELS = 32 * 32 * 2  # >= 2 merged tokens
IMAGE_MAX_PIXELS = 32 * 32 * 16  # <= 16 merged tokens (one merged token covers 32x32 pixels)
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]

SEED = 1234


def default_cache_dir() -> pathlib.Path:
    """``$BGRPO_CACHE_DIR/tiny-models`` or ``~/.cache/bgrpo/tiny-models``."""
    root = os.environ.get("BGRPO_CACHE_DIR")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "bgrpo"
    return base / "tiny-models"


# --- tokenizer ---------------------------------------------------------------------------------

_WORDS = (
    "click button link text input field submit ok cancel yes no select option check box tab menu "
    "enter type focus press key scroll hover drag drop the a an of to in on for with is are this that "
    "goal url page screen element heading list item dialog close open search form name email password "
    "date time number color shape left right up down first last next previous find choose copy paste "
    "textbox checkbox radio combobox generic paragraph image static StaticText RootWebArea main "
    "miniwob task reward done error action observation history step think answer agent web browser"
).split()
_ACTIONS = [
    "click('{bid}')",
    "dblclick('{bid}')",
    "hover('{bid}')",
    "focus('{bid}')",
    "fill('{bid}', '{word}')",
    "select_option('{bid}', '{word}')",
    "press('{bid}', 'Enter')",
    "scroll(0, {num})",
    "noop()",
    "send_msg_to_user('{word}')",
]


def _corpus(seed: int, lines: int = 3000) -> list[str]:
    """Agent-like text: goals, accessibility-tree lines and actions, so common strings get merges."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.35:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))).capitalize() + ".")
        elif kind < 0.7:
            role = rng.choice(["button", "link", "textbox", "checkbox", "StaticText", "heading"])
            out.append(f"[{rng.randint(1, 200)}] {role} '{rng.choice(_WORDS).title()}'")
        else:
            action = rng.choice(_ACTIONS).format(
                bid=rng.randint(1, 200), word=rng.choice(_WORDS), num=rng.randint(-500, 500)
            )
            out.append(f"Action: {action}")
    # Every byte-level symbol and digit appears at least once.
    out.append("".join(chr(c) for c in range(32, 127)))
    return out


def build_tokenizer(seed: int = SEED):
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template (PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=TEXT_SPEC["max_position_embeddings"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# --- models ------------------------------------------------------------------------------------


def _spec_hash(kind: str) -> str:
    import tokenizers
    import transformers

    spec = {
        "kind": kind,
        "build_version": _BUILD_VERSION,
        "text": TEXT_SPEC,
        "vision": VISION_SPEC if kind == "vl" else None,
        "mrope": MROPE_SECTION,
        "pixels": [IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS, IMAGE_MEAN, IMAGE_STD],
        "special": SPECIAL_TOKENS,
        "bpe": BPE_VOCAB_SIZE,
        "template": CHAT_TEMPLATE,
        "seed": SEED,
        # The saved config/tokenizer format follows the library versions that wrote it.
        "versions": [transformers.__version__, tokenizers.__version__],
    }
    blob = json.dumps(spec, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert all(isinstance(i, int) and i >= 0 for i in ids.values()), ids
    return ids


def _text_config_kwargs(tokenizer) -> dict[str, Any]:
    ids = _token_ids(tokenizer)
    spec = dict(TEXT_SPEC)
    rope_theta = spec.pop("rope_theta")
    return dict(
        spec,
        vocab_size=len(tokenizer),  # == tokenizer size: every sampled id decodes
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )


def _save_generation_config(out: pathlib.Path, tokenizer) -> None:
    from transformers import GenerationConfig

    ids = _token_ids(tokenizer)
    GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=True,
    ).save_pretrained(out)


def _write_text_model(out: pathlib.Path) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen3Config(**_text_config_kwargs(tokenizer), torch_dtype="float32")
    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _save_generation_config(out, tokenizer)


def _write_vl_model(out: pathlib.Path) -> None:
    import torch
    from transformers import Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer()
    ids = _token_ids(tokenizer)
    text = _text_config_kwargs(tokenizer)
    text["rope_parameters"] = dict(
        text["rope_parameters"], mrope_section=MROPE_SECTION, mrope_interleaved=True
    )
    tie = text.pop("tie_word_embeddings")
    vision = dict(VISION_SPEC, out_hidden_size=TEXT_SPEC["hidden_size"])
    config = _qwen3_vl_config(text, vision, ids, tie, "float32")
    torch.manual_seed(SEED)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _save_generation_config(out, tokenizer)

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=VISION_SPEC["patch_size"],
        temporal_patch_size=VISION_SPEC["temporal_patch_size"],
        merge_size=VISION_SPEC["spatial_merge_size"],
        min_pixels=IMAGE_MIN_PIXELS,
        max_pixels=IMAGE_MAX_PIXELS,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    image_processor.save_pretrained(out)
    # Name the model's processor class, as real Qwen3-VL checkpoints do; the image processor type is
    # the generic name so transformers picks its torchvision or PIL backend, whichever exists.
    pre = json.loads((out / "preprocessor_config.json").read_text())
    pre.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen3VLProcessor")
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True))
    # vLLM always builds Qwen3VLProcessor with a video processor, which reads this file (real
    # checkpoints ship it). Written by hand: constructing Qwen3VLVideoProcessor needs torchvision.
    video = {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "processor_class": "Qwen3VLProcessor",
        "patch_size": VISION_SPEC["patch_size"],
        "temporal_patch_size": VISION_SPEC["temporal_patch_size"],
        "merge_size": VISION_SPEC["spatial_merge_size"],
        "size": {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS},
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "do_sample_frames": True,
        "fps": 2,
        "min_frames": 4,
        "max_frames": 8,
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True))


def _build(kind: str, cache_dir: str | os.PathLike | None) -> pathlib.Path:
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"tiny-qwen3{'-vl' if kind == 'vl' else ''}-{_spec_hash(kind)}"
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        (_write_vl_model if kind == "vl" else _write_text_model)(tmp)
        try:
            os.rename(tmp, final)  # atomic on one filesystem
        except OSError:
            # Another builder won the race; its model is identical (deterministic build).
            if not (final / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tiny_text_model(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Builds (or finds in the cache) the tiny Qwen3 text model; returns its folder."""
    return _build("text", cache_dir)


def build_tiny_vl_model(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Builds (or finds in the cache) the tiny Qwen3-VL model; returns its folder."""
    return _build("vl", cache_dir)


# --- real shapes, random weights (GPU benchmarks) ---------------------------------------------

# Qwen/Qwen3-VL-2B-Instruct's config.json values (architecture only; weights are random here).
QWEN3_VL_2B_TEXT = {
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
}
QWEN3_VL_2B_VISION = {
    "depth": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 2048,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [5, 11, 17],
    "hidden_act": "gelu_pytorch_tanh",
}
QWEN3_VL_2B_TIE_WORD_EMBEDDINGS = True
# Qwen3-VL's image processor: 32x32 pixels per merged token, 256..16384 tokens per image.
QWEN3_VL_2B_PIXELS = {"min_pixels": 65536, "max_pixels": 16777216}


def _qwen3_vl_config(text: dict, vision: dict, ids: dict[str, int], tie: bool, dtype: str):
    """A `Qwen3VLConfig` from text/vision fields and the special-token ids (keys: `SPECIAL_TOKENS`)."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie,
        torch_dtype=dtype,
    )


def qwen3_vl_2b_config(special_ids: dict[str, int]):
    """Qwen3-VL-2B-Instruct's architecture as a `Qwen3VLConfig`, with the given special-token ids
    (keys: the `SPECIAL_TOKENS` strings)."""
    text = dict(QWEN3_VL_2B_TEXT, bos_token_id=special_ids["<|endoftext|>"],
                eos_token_id=special_ids["<|im_end|>"], pad_token_id=special_ids["<|endoftext|>"])
    return _qwen3_vl_config(text, QWEN3_VL_2B_VISION, special_ids, QWEN3_VL_2B_TIE_WORD_EMBEDDINGS, "bfloat16")


def build_qwen3_vl_2b_shape(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Random Qwen3-VL-2B-shaped model folder (bfloat16, ~4.3 GB), cached; built atomically like
    the tiny models. For GPU benchmarks and tests: the real architecture, no download."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir().parent / "shaped-models"
    final = cache_dir / "random-qwen3-vl-2b-shape-v1"
    if (final / "config.json").exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".qwen3-vl-2b.", dir=cache_dir))
    try:
        # The tiny tokenizer padded with unused special tokens to the real vocabulary size, so every
        # id the random model samples decodes.
        tokenizer = build_tokenizer()
        real_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        pad = QWEN3_VL_2B_TEXT["vocab_size"] - len(tokenizer)
        tokenizer.add_tokens([f"<|unused_{i}|>" for i in range(pad)], special_tokens=True)
        config = qwen3_vl_2b_config(real_ids)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _save_generation_config(tmp, tokenizer)
        Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3, **QWEN3_VL_2B_PIXELS).save_pretrained(tmp)
        pre = json.loads((tmp / "preprocessor_config.json").read_text())
        pre.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen3VLProcessor")
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        video = dict(json.loads((build_tiny_vl_model() / "video_preprocessor_config.json").read_text()))
        video["size"] = {"shortest_edge": QWEN3_VL_2B_PIXELS["min_pixels"], "longest_edge": QWEN3_VL_2B_PIXELS["max_pixels"]}
        (tmp / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    """`bgrpo build-tiny-models`: build both tiny models and print their folders."""
    parser = argparse.ArgumentParser(prog="bgrpo build-tiny-models", description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", default=None, help="cache root (default: %(default)s -> " + str(default_cache_dir()) + ")")
    args = parser.parse_args(argv)
    print("text:", build_tiny_text_model(args.cache_dir))
    print("vl:  ", build_tiny_vl_model(args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
