"""What a transformers user gets from an export: the tokenizer's outputs, the
logits of `model(**tok(text))` and the greedy tokens of `generate(**tok(text))`,
as JSON.  The tests call `report` in-process (the venv's transformers) and run
this file under another transformers version (`python tests/hf_client.py
'{"FOLDER": [TEXT, ...], ...}'`, that version first on PYTHONPATH: one
report per folder), and compare."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def report(folder: str, texts: list[str], new_tokens: int = 8) -> dict:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    out = {
        "transformers": transformers.__version__,
        "tokenizer_class": type(tok).__name__,
        "special": {name: getattr(tok, f"{name}_token_id") for name in ("bos", "eos", "pad")},
        "texts": [],
    }
    for text in texts:
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0].float()
            # as users call it: every key the tokenizer returns goes to the model
            greedy = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
        out["texts"].append(
            {
                "encoding": {k: v[0].tolist() for k, v in enc.items()},
                "logits": logits.tolist(),
                "greedy": greedy[0, enc["input_ids"].shape[1] :].tolist(),
            }
        )
    return out


if __name__ == "__main__":
    print(json.dumps({folder: report(folder, texts) for folder, texts in json.loads(sys.argv[1]).items()}))
