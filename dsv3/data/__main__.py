"""`python -m dsv3.data [--data PATH] [--vocab-size N] ...`: prepare a corpus and print its figures.

Runs the whole pipeline (fetch, split, tokenizer, tokenization, all cached) and prints sizes,
timings, bytes per token and the unigram baseline the trained model has to beat.
"""

from __future__ import annotations

import argparse
import math
import time

from dsv3.data.dataset import DataConfig, prepare_data
from dsv3.data.metrics import bytes_per_token, unigram_entropy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv3.data", description=__doc__.splitlines()[0])
    p.add_argument("--data", help=".txt/.jsonl/.parquet file or directory (default: stdlib + Shakespeare)")
    p.add_argument("--tokenizer", help="existing tokenizer.json or directory (default: train a BPE)")
    p.add_argument("--vocab-size", type=int, default=DataConfig.vocab_size)
    p.add_argument("--max-bytes", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="cache directory (default: $DSV3_CACHE or ~/.cache/dsv3)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    cfg = DataConfig(
        data=a.data,
        tokenizer=a.tokenizer,
        vocab_size=a.vocab_size,
        max_bytes=a.max_bytes,
        seed=a.seed,
        cache=a.cache,
    )
    d = prepare_data(cfg)
    total = time.perf_counter() - t0
    s = d.stats
    print(f"documents      train {s['train_docs']:,}  val {s['val_docs']:,}")
    print(f"bytes          train {s['train_bytes']:,}  val {s['val_bytes']:,}")
    vocab = d.tokenizer.vocab_size
    print(f"tokens         train {s['train_tokens']:,}  val {s['val_tokens']:,}  (vocab {vocab:,})")
    print(f"bytes/token    train {bytes_per_token(d.train.tokens, d.tokenizer):.3f}  "
          f"val {bytes_per_token(d.val.tokens, d.tokenizer):.3f}")  # fmt: skip
    h = unigram_entropy(d.train.tokens, d.val.tokens, d.tokenizer.vocab_size)
    print(
        f"unigram        {h:.3f} nats/token on val (uniform would be {math.log(d.tokenizer.vocab_size):.3f})"
    )
    print(f"time           corpus {s['corpus_s']:.1f}s  tokenizer {s['tokenizer_s']:.1f}s  "
          f"tokenize {s['tokenize_s']:.1f}s  total {total:.1f}s")  # fmt: skip
    print(f"tokenizer      {s['tokenizer']}")
    print(f"cache key      {d.key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
