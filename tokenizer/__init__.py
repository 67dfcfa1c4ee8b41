"""hgrn_megatron.tokenizer: SentencePiece tokenizer training, loading and metadata checks."""
