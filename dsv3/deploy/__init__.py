"""Multi-process deployment of the inference engine: expert parallelism, EPLB, prefill/decode disaggregation (DESIGN §8, paper §3.4)."""
