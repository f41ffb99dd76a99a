"""Run by tests/convert/test_hf_transformers.py in a fresh process: loads an `export-hf` directory
with transformers alone, as a user without pangu would (any import of pangu fails here; the test
runs it offline), and saves what the model and the tokenizer give for the test to compare with pangu.

    python tests/probes/hf_probe.py REQUEST.json RESULT.pt
"""

from __future__ import annotations

import importlib.abc
import json
import sys


class _NoPangu(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pangu" or name.startswith("pangu."):
            raise ImportError(f"{name}: the exported code must not need pangu")
        return None


def main(request_file: str, result_file: str) -> None:
    sys.meta_path.insert(0, _NoPangu())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.cache_utils import Cache

    request = json.loads(open(request_file, encoding="utf-8").read())
    model = AutoModelForCausalLM.from_pretrained(request["dir"], trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(request["dir"], trust_remote_code=True)
    model.eval()
    result = {"model_class": type(model).__name__, "dtype": str(model.dtype)}
    with torch.no_grad():
        result["logits"] = model(torch.tensor(request["input_ids"])).logits
        prompt = tokenizer(request["prompt"], return_tensors="pt")
        result["prompt_ids"] = prompt["input_ids"][0].tolist()
        steps = {}
        for use_cache in (True, False):
            out = model.generate(
                **prompt, max_new_tokens=request["max_new_tokens"], do_sample=False, use_cache=use_cache
            )
            steps[use_cache] = out[0, prompt["input_ids"].shape[1] :].tolist()
        result["generated"], result["generated_no_cache"] = steps[True], steps[False]
        first = model(prompt["input_ids"], use_cache=True)
        cache = first.cache if "cache" in first else first.past_key_values
        result["cache_class"] = type(cache).__name__
        result["cache_is_a_transformers_cache"] = isinstance(cache, Cache)
        result["cache_length"] = cache.get_seq_length()
    ids = tokenizer(request["text"])["input_ids"]
    result["text_ids"] = ids
    result["text_decoded"] = tokenizer.decode(ids)
    result["generated_text"] = tokenizer.decode(result["generated"], skip_special_tokens=True)
    batch = tokenizer([request["prompt"], request["text"]], padding=True)
    result["batch_ids"], result["batch_mask"] = batch["input_ids"], batch["attention_mask"]
    result["special_ids"] = {"eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    torch.save(result, result_file)


if __name__ == "__main__":
    main(*sys.argv[1:])
