"""The data epoch: which pass over a source's shards the data position has
reached, checked against the windows actually read (datasets whose tokens are
all distinct, so a token seen twice in a stream is a second pass); the same on
every rank and after a resume; logged as data_epoch (W&B data/epoch); and the
one warning when a source wraps around, the tiny corpus shorter than a window
included."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import make_texts, rank_sequences, torchrun

from megagpt.data.loader import Batches
from megagpt.data.mixture import Mixture
from megagpt.data.shards import FORMAT, VERSION, open_dataset
from megagpt.data.shardwriter import ShardSink, manifest_entry
from megagpt.metrics import wandb_name

L = 16
EOD = 0


def write_numbered(out: Path, doc_lengths: list[int], docs_per_shard: int, first_id: int) -> Path:
    """A prepared dataset whose tokens are first_id, first_id + 1, ... in order
    (documents of the given lengths, EOD 0): every token of it is distinct."""
    out.mkdir(parents=True)
    written: list[dict] = []
    sink = ShardSink(out, "shard", docs_per_shard=docs_per_shard, shard_bytes=1 << 30, on_shard=written.append)
    next_id = first_id
    for k, n in enumerate(doc_lengths):
        sink.add(np.arange(next_id, next_id + n, dtype="<u4").tobytes(), n, (0, k))
        next_id += n
    sink.close()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": "uint32",
        "vocab_size": 1 << 20,
        "eod_id": EOD,
        "tokenizer": "tokenizer.json",
        "documents": len(doc_lengths),
        "tokens": sum(doc_lengths),
        "shards": [manifest_entry(s) for s in written],
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def streams(path: Path, num_streams: int, name: str, **settings):
    from megagpt.data.streams import ShardStreams, StreamSettings

    return ShardStreams(open_dataset(str(path)), StreamSettings(num_streams, L, **{"seed": 7, **settings}), name=name)


def observed_epochs(mix: Mixture, count: int) -> list[list[int]]:
    """Each source's epoch after each of the first `count` global sequences, from
    what they hold: the most times any one token was a target (window[1:]) in
    one stream.  A stream's epochs read its shards' tokens once each (with
    shuffle_shards=false each stream reads the same shards every epoch; with
    one stream, all of them), so that count is the passes begun.  (A pass
    that starts exactly where a window ends would be seen one window late: in
    the test data none does, see `numbered`.)"""
    seen = {}  # (source, stream) -> Counter of target tokens
    epochs, out = [1] * len(mix.sources), []
    for g, (window, source) in zip(range(count), rank_sequences(mix, 0, 1, 0)):
        counter = seen.setdefault((source, g % mix.num_streams), Counter())
        counter.update(int(t) for t in window[1:] if t != EOD)
        epochs[source] = max(epochs[source], max(counter.values(), default=1))
        out.append(list(epochs))
    return out


def check_against_the_data(mix: Mixture, count: int, least_epochs: int) -> None:
    observed = observed_epochs(mix, count)
    assert min(observed[-1]) >= least_epochs  # every source goes through several passes
    assert mix.epochs(0) == [1] * len(mix.sources)
    for consumed in range(1, count + 1):
        assert mix.epochs(consumed) == observed[consumed - 1], consumed
    for i in range(len(mix.sources)):
        for epoch in range(2, observed[-1][i] + 1):
            first = next(c + 1 for c, e in enumerate(observed) if e[i] >= epoch)
            assert mix.reaches(i, epoch) == first, (i, epoch)


def pass_lengths(doc_lengths: list[int], docs_per_shard: int, num_streams: int) -> list[int]:
    """Tokens each stream reads in a pass without shuffled shards (documents and their EODs)."""
    shards = [
        sum(n + 1 for n in doc_lengths[k : k + docs_per_shard]) for k in range(0, len(doc_lengths), docs_per_shard)
    ]
    return [sum(shards[s::num_streams]) for s in range(num_streams)]


def no_pass_ends_a_window(lengths: list[int], epochs: int = 7) -> bool:
    """No pass of these lengths ends where a window does, in the first `epochs` (see observed_epochs)."""
    return all(e * n % L for n in lengths for e in range(1, epochs + 1))


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """Two datasets of distinct tokens (ids from 1 and from 100000), such that no
    pass of one stream (of one or two, shards unshuffled) ends at a window's end."""
    root = tmp_path_factory.mktemp("numbered")
    rng = np.random.default_rng(0)
    while True:
        a, b = [int(n) for n in rng.integers(3, 40, 24)], [int(n) for n in rng.integers(3, 30, 18)]
        lengths = pass_lengths(a, 3, 1) + pass_lengths(a, 3, 2) + pass_lengths(b, 2, 2)
        if no_pass_ends_a_window(lengths):
            return write_numbered(root / "a", a, 3, first_id=1), write_numbered(root / "b", b, 2, first_id=100_000)


def passes(source) -> list[int]:
    return [int(source.epoch_starts(s, 0, 1)[1]) for s in range(source.num_streams)]


def test_one_stream_shuffled_epoch_and_wrap_positions_follow_the_data(numbered):
    a, _ = numbered
    source = streams(a, 1, "a", shuffle_buffer=5)
    assert no_pass_ends_a_window(passes(source))
    mix = Mixture([source], [1.0])
    per_pass = source.pass_tokens() // L
    check_against_the_data(mix, 4 * per_pass, least_epochs=4)


def test_mixture_epochs_per_source_follow_the_data(numbered):
    a, b = numbered
    sources = [streams(a, 2, "a", shuffle=False, shuffle_buffer=3), streams(b, 2, "b", shuffle=False)]
    assert all(no_pass_ends_a_window(passes(s)) for s in sources)
    mix = Mixture(sources, [0.7, 0.3], period=10, names=["a", "b"])
    count = 3 * sources[0].pass_tokens() // L * 10 // 7
    check_against_the_data(mix, count, least_epochs=3)
    assert any(len(set(mix.epochs(c))) > 1 for c in range(count))  # each source has an epoch of its own


def test_epoch_starts_match_the_shard_deal(numbered):
    """The epochs worked out many at a time are those of shards_of, epoch by epoch,
    with bad shards adding no tokens."""
    a, _ = numbered
    source = streams(a, 4, "a")
    source.bad.add(source.shards[5].url)
    starts = [source.epoch_starts(s, 0, 40)[:41] for s in range(4)]
    for s in range(4):
        lengths = [sum(source._tokens(source.shards[i]) for i in source.shards_of(s, e)) for e in range(40)]
        np.testing.assert_array_equal(starts[s], np.concatenate([[0], np.cumsum(lengths)]))


def take(b: Batches, n: int) -> None:
    for _ in range(n):
        b.next_windows()


def test_epoch_is_the_same_on_every_rank_and_after_resume(numbered):
    a, b = numbered

    def mix():
        return Mixture(
            [streams(a, 2, "a"), streams(b, 2, "b", shuffle_buffer=4)], [0.5, 0.5], period=6, names=["a", "b"]
        )

    ranks = [Batches(mix(), r, 2, 3, group_tokens=4 * (L + 1)) for r in range(2)]
    resumed = Batches(mix(), 0, 2, 3, group_tokens=4 * (L + 1))
    try:
        seen = []
        for _ in range(30):
            for r in ranks:
                take(r, 1)
            assert ranks[0].data_epochs == ranks[1].data_epochs
            seen.append(ranks[0].data_epochs)
            if len(seen) == 17:
                resumed.load_state_dict(ranks[0].state_dict())
            if len(seen) > 17:
                take(resumed, 1)
                assert resumed.data_epochs == ranks[0].data_epochs
        assert seen[0] == {"a": 1, "b": 1} and seen[-1]["b"] >= 3
        assert ranks[0].data_epoch == max(seen[-1].values())
    finally:
        for x in (*ranks, resumed):
            x.close()


def wrap_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "wrapped around" in r.getMessage()]


def test_wrap_warning_once_when_the_first_repeated_sequence_is_taken(numbered, caplog):
    """Rank 0 warns as it hands out the micro-batch holding the first sequence of a
    second pass (found from the data: observed_epochs); rank 1 says nothing."""
    a, _ = numbered

    def mix():
        return Mixture([streams(a, 2, "a", shuffle_buffer=4)], [1.0], names=["web"])

    micro, world = 3, 2
    step = micro * world  # sequences per step: one micro-batch per rank
    count = 2 * mix().sources[0].pass_tokens() // L
    first = next(c for c, e in enumerate(observed_epochs(mix(), count)) if e[0] == 2)  # the sequence that wraps
    ranks = [
        Batches(mix(), r, world, micro, group_tokens=2 * micro * (L + 1), sequences_per_step=step) for r in range(world)
    ]
    try:
        with caplog.at_level(logging.WARNING, logger="megagpt"):
            while ranks[0].consumed + step <= first:  # the steps before the one that holds it
                for b in ranks:
                    take(b, 1)
            assert not wrap_warnings(caplog) and ranks[0].data_epoch == 1
            for b in ranks:
                take(b, 1)
            assert ranks[0].data_epoch == 2
            one_pass = mix().sources[0].pass_tokens()
            assert wrap_warnings(caplog) == [
                f"data: source 'web' wrapped around at sequence {first} (step {first // step + 1}): one "
                f"pass is {one_pass:,} tokens, about {one_pass / L / step:.2g} steps; epoch 2 starts"
            ]  # 5.7
            for b in ranks:  # on into epoch 3, back by a rollback and on again: still the one warning
                take(b, 2 * one_pass // L // step)
                b.load_state_dict({**b.state_dict(), "consumed": 0})
                take(b, first // step + 2)
            assert ranks[0].data_epoch == 2 and len(wrap_warnings(caplog)) == 1
    finally:
        for b in ranks:
            b.close()


def test_tiny_corpus_says_it_repeats_within_one_window(tmp_path, caplog):
    """13 tokens at seq_len 128: the first window already reads them about 9 times."""
    from megagpt.data.streams import ShardStreams, StreamSettings

    tiny = write_numbered(tmp_path / "tiny", [13], 1, first_id=1)
    mix = Mixture([ShardStreams(open_dataset(str(tiny)), StreamSettings(1, 128, seed=0), name="tiny")], [1.0])
    b = Batches(mix, 0, 1, 2, sequences_per_step=2)
    try:
        with caplog.at_level(logging.WARNING, logger="megagpt"):
            take(b, 3)
        # 2 windows end at token 256 of the stream: passes of 14 tokens (13 and an EOD) begin at 0, 14, ... 252.
        assert wrap_warnings(caplog) == [
            "data: source 'tiny' wrapped around at sequence 0 (step 1): one pass is 14 tokens, shorter than one "
            "window of 129: each window repeats this tiny corpus about 9 times; now in epoch 19"
        ]
        assert b.consumed == 6 and b.data_epoch == 6 * 128 // 14 + 1
        # Exact however far (its passes are all alike): pass 10**10 begins at token (10**10 - 1) * 14.
        assert mix.epochs(10**12) == [10**12 * 128 // 14 + 1]
        assert mix.reaches(0, 10**10) == (10**10 - 1) * 14 // 128 + 1
    finally:
        b.close()


@pytest.mark.slow
def test_training_logs_the_data_epoch(tmp_path):
    """A real run over a mixture of a 13-token corpus at seq_len 128 (the user's
    trial) and a larger one: metrics.jsonl has data_epoch (the furthest) and
    data_epoch/<source>, as the position gives them; W&B names them data/epoch
    and data/epoch/<source>; the tiny corpus's warning is said once."""
    from megagpt.config import TrainerConfig
    from megagpt.data.prepare import prepare
    from megagpt.data.streams import ShardStreams, StreamSettings

    texts = {"tiny": ["one two three four five six"], "big": make_texts(30, seed=3)}
    for name, docs in texts.items():
        (tmp_path / name).mkdir()
        for k, text in enumerate(docs):
            (tmp_path / name / f"{k}.txt").write_text(text)
    prepare([str(tmp_path / "tiny")], str(tmp_path / "tiny-data"), vocab_size=300, log=None)
    prepare(
        [str(tmp_path / "big")],
        str(tmp_path / "big-data"),
        tokenizer=str(tmp_path / "tiny-data/tokenizer.json"),
        docs_per_shard=30,
        log=None,
    )
    run_dir = tmp_path / "run"
    r = torchrun(
        [
            f"run.dir={run_dir}",
            "data=mixture",
            "data.seq_len=128",
            "data.shuffle_buffer=1",
            f"data.sources=[{{name:tiny,urls:{tmp_path}/tiny-data,weight:0.5}},"
            f"{{name:big,urls:{tmp_path}/big-data,weight:0.5}}]",
            "data.mix_period=10",
            "model.n_layer=1",
            "model.n_head=2",
            "model.n_embd=32",
            "trainer.micro_batch_size=2",
            "trainer.max_steps=6",
            "trainer.log_every=2",
            "trainer.save_every=100",
            "trainer.eval_every=0",
            "logger=none",
            "trainer.peak_flops=1e11",
        ],
        cwd=tmp_path,
        nproc=1,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    settings = StreamSettings(1, 128, seed=TrainerConfig().seed, shuffle_buffer=1)
    mix = Mixture(
        [ShardStreams(open_dataset(str(tmp_path / f"{n}-data")), settings, name=n) for n in texts],
        [0.5, 0.5],
        period=10,
    )
    expected = [
        {
            "step": step,
            "data_epoch": max(mix.epochs(2 * step)),
            "data_epoch/tiny": mix.epochs(2 * step)[0],
            "data_epoch/big": mix.epochs(2 * step)[1],
        }
        for step in (2, 4, 6)
    ]
    assert [{k: x[k] for k in expected[0]} for x in records] == expected
    assert expected[-1]["data_epoch/tiny"] > 50 and expected[-1]["data_epoch/big"] == 1
    assert wandb_name("data_epoch") == "data/epoch" and wandb_name("data_epoch/tiny") == "data/epoch/tiny"
    warnings = [x for x in (r.stdout + r.stderr).splitlines() if "wrapped around" in x]
    one_pass = mix.sources[0].pass_tokens()
    assert len(warnings) == 1 and one_pass < 129
    assert (
        f"data: source 'tiny' wrapped around at sequence {mix.reaches(0, 2) - 1} (step 1): one pass is "
        f"{one_pass} tokens, shorter than one window of 129: each window repeats this tiny corpus about "
        f"{129 / one_pass:.0f} times; now in epoch"
    ) in warnings[0]
