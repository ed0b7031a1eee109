"""`python -m megagpt.generate --model DIR --prompt TEXT`: continue text.

DIR is a megagpt checkpoint (or a run / checkpoints directory: the newest
checkpoint that verifies, the newer damaged ones named on stderr; a damaged
checkpoint named explicitly stops with the reason) or a folder written by
`python -m megagpt.export`.
Prompts come from --prompt (repeatable), or interactively (--interactive:
read a prompt, print its continuation, repeat until end of input).

Decoding keeps a key/value cache, so after the prompt each new token costs
one position of compute.  --temperature 0 is greedy; otherwise the next token
is sampled from softmax(logits / temperature), restricted to the --top-k most
likely tokens and to the smallest set whose probability reaches --top-p.
Generation stops at the end-of-document token, after --max-new-tokens, or
where the model's context (max_seq_len, or Mistral's attention window) is
full: it does not slide the context on, and says on stderr when that stopped
it early.  A prompt that leaves no room in the context keeps its last
tokens, leaving room for --max-new-tokens new ones but at least half the
context to the prompt, and says on stderr how many it dropped.  An empty
prompt starts from the end-of-document token (the start of a document in
training).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from megagpt.model.gpt import GPT


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, gen: torch.Generator | None
) -> int:
    """One token id from logits (V,)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the set that reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: int | None = None,
) -> list[int]:
    """The new token ids after `prompt` (a non-empty list of ids)."""
    if not prompt:
        raise ValueError("empty prompt: give at least one token")
    limit = context(model)
    if len(prompt) >= limit:
        raise ValueError(
            f"prompt of {len(prompt)} tokens leaves no room: the model's max_seq_len (or attention window) is {limit}"
        )
    device = model.wte.weight.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    budget = min(max_new_tokens, limit - len(prompt))
    cache = model.new_cache(1, len(prompt) + budget)
    logits = model(torch.tensor([prompt], device=device), cache=cache)[0, -1]  # (V,)
    out: list[int] = []
    while len(out) < budget:
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        out.append(nxt)
        if nxt == stop or len(out) == budget:
            break
        logits = model(torch.tensor([[nxt]], device=device), cache=cache)[0, -1]
    return out


def context(model: GPT) -> int:
    """How many tokens, prompt and new ones, the model attends to."""
    # Past a sliding window (Mistral) megagpt's full attention would differ from the model's.
    return min(model.cfg.max_seq_len, model.cfg.sliding_window or model.cfg.max_seq_len)


def fit_prompt(prompt: list[int], limit: int, max_new_tokens: int) -> list[int]:
    """`prompt` when it leaves room for a new token in a context of `limit`
    tokens; else its last tokens, leaving room for `max_new_tokens` new ones
    but keeping at least half the context."""
    if len(prompt) < limit:
        return prompt
    keep = min(max(limit - max_new_tokens, limit // 2, 1), limit - 1)
    return prompt[len(prompt) - keep :]


def load(model_dir: str, attention: str = "sdpa"):
    """(model, tokenizers.Tokenizer, eod id) from a checkpoint or an exported folder."""
    from megagpt.data.tokenizer import eod_id, load_tokenizer

    if os.path.isfile(os.path.join(model_dir, "config.json")):
        from megagpt.hf import load_hf_folder

        model = load_hf_folder(model_dir, attention)
        tok_dir = model_dir
    else:
        from megagpt.export import find_checkpoint, load_checkpoint_model

        tok_dir = find_checkpoint(model_dir)  # verified; skipped damaged ones are named on stderr
        model, _ = load_checkpoint_model(tok_dir, attention)
    tok = load_tokenizer(tok_dir)
    return model, tok, eod_id(tok, tok_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megagpt.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="checkpoint, run dir or exported Hugging Face folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--interactive", action="store_true", help="read prompts from standard input")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "eager", "flash_attn"])
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt (ids and text)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if not args.prompt and not args.interactive:
        p.error("give --prompt TEXT (repeatable) or --interactive")
    from megagpt.checkpoint import CheckpointError

    try:
        model, tok, eod = load(args.model, args.attention)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"megagpt.generate: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2

    limit = context(model)

    def run(text: str) -> None:
        whole = tok.encode(text).ids or [eod]
        ids = fit_prompt(whole, limit, args.max_new_tokens)
        dropped = len(whole) - len(ids)
        if dropped:
            print(
                f"megagpt.generate: the prompt's {len(whole)} tokens leave no room in the model's context of "
                f"{limit}: dropped its first {dropped} of {len(whole)}, kept the last {len(ids)} (room for "
                f"{min(args.max_new_tokens, limit - len(ids))} new)",
                file=sys.stderr,
                flush=True,
            )
        try:
            new = generate(
                model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, stop=eod
            )
        except ValueError as e:  # a context of one token: no room at all
            print(f"megagpt.generate: error: {e}", file=sys.stderr)
            return
        if len(new) < args.max_new_tokens and new[-1] != eod:
            print(
                f"megagpt.generate: stopped after {len(new)} of {args.max_new_tokens} new tokens: the model's "
                f"context of {limit} is full",
                file=sys.stderr,
                flush=True,
            )
        shown = new[:-1] if new and new[-1] == eod else new
        completion = tok.decode(shown)
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": text,
                        "prompt_ids": ids,
                        "prompt_tokens_dropped": dropped,
                        "ids": new,
                        "completion": completion,
                    }
                ),
                flush=True,
            )
        else:
            print(text + completion, flush=True)

    for text in args.prompt:
        run(text)
    if args.interactive:
        while True:
            try:
                text = input("> " if sys.stdin.isatty() else "")
            except EOFError:
                break
            run(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
