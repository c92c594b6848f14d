"""Data pipeline (DESIGN §6): corpus -> tokenizer -> FIM -> packed, sharded, resumable batches.

from dsv3.data import DataConfig, prepare_data, PackedLoader, val_batches
data = prepare_data(DataConfig())                      # default corpus, trained 8192-entry BPE
loader = PackedLoader(data.train, seq_len=512, seed=0, rank=0, world_size=1)
batch = loader.next_batch(16)                           # LongTensor [16, 513]
"""

from dsv3.data.corpus import Corpus, CorpusError, Document, load_corpus
from dsv3.data.dataset import DataConfig, Dataset, TokenizedSplit, prepare_data
from dsv3.data.fetch import FetchError, cache_dir
from dsv3.data.fim import FIMConfig, fim_prompt
from dsv3.data.loader import PackedLoader, val_batches
from dsv3.data.metrics import bits_per_byte, bytes_per_token, unigram_entropy
from dsv3.data.tokenizer import Tokenizer, TokenizerError

__all__ = [
    "Corpus", "CorpusError", "DataConfig", "Dataset", "Document", "FIMConfig", "FetchError",
    "PackedLoader", "TokenizedSplit", "Tokenizer", "TokenizerError", "bits_per_byte",
    "bytes_per_token", "cache_dir", "fim_prompt", "load_corpus", "prepare_data", "unigram_entropy",
    "val_batches",
]  # fmt: skip
