"""Benchmarks that print megagpt's figures beside a reference, measured in the same run.

    python -m megagpt.bench data      the data loader against raw reads of the same shards
    python -m megagpt.bench prepare   prepare's tokens/s per worker on Parquet against tokenizers' encode_batch
    python -m megagpt.bench train     megagpt's training step against transformers' GPT2LMHeadModel (CPU)
    python -m megagpt.bench scaling   ZeRO-3 vs ZeRO-0 over 2 processes vs 1 process, where the time goes
    python -m megagpt.bench memory    per-rank memory of ZeRO-0 and ZeRO-3 as ranks grow
    python -m megagpt.bench cost      step time and memory against model width and sequence length (CPU)
    python -m megagpt.bench gpu       tokens/s and MFU on one CUDA GPU (bf16)
    python -m megagpt.bench compile   start-up cost of compiled blocks vs whole-model compile (and transformers)

Benchmarks are not tests: they print tables (and --json files); the README
quotes their figures with the command that made them.
"""
