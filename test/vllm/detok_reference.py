"""vLLM's own detokenization of given token ids, for TestDetokenizedTextMatchesVLLM.

Reads {"model": DIR, "cases": [...]} on stdin; each case has the prompt text (tokenized here as
vLLM's completions endpoint tokenizes it), the output ids one engine step each, and the
sampling parameters that affect text (stop, include_stop_str_in_output, min_tokens,
skip_special_tokens, spaces_between_special_tokens) plus whether the engine ended the request on
its last token (EOS). Runs vLLM's FastIncrementalDetokenizer (what AsyncLLM's output processor
runs) and prints, per case, {"text", "num_tokens", "stop"} as JSON on the last line.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    spec = json.load(sys.stdin)
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer, IncrementalDetokenizer

    tok = AutoTokenizer.from_pretrained(spec["model"], local_files_only=True)
    results = []
    for case in spec["cases"]:
        prompt = tok.encode(case["prompt"], add_special_tokens=True)
        sp = SamplingParams(max_tokens=None, stop=case.get("stop") or None,
                            include_stop_str_in_output=case.get("include", False),
                            min_tokens=case.get("min_tokens", 0),
                            skip_special_tokens=case.get("skip", True),
                            spaces_between_special_tokens=case.get("spaces", True))
        req = SimpleNamespace(request_id="ref", sampling_params=sp, prompt_token_ids=prompt, prompt_embeds=None)
        det = IncrementalDetokenizer.from_new_request(tok, req)
        assert isinstance(det, FastIncrementalDetokenizer), type(det)
        text, stop = "", None
        ids = case["ids"]
        for i, t in enumerate(ids):
            last = i == len(ids) - 1
            stop = det.update([t], case.get("eos", False) and last)
            finished = stop is not None or last
            text += det.get_next_output_text(finished, True)
            if stop is not None:
                break
        results.append({"text": text, "num_tokens": det.num_output_tokens(), "stop": stop,
                        "prompt_ids": prompt})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
