"""hgrn_megatron.export: Hugging Face export of trained checkpoints (`hgrn-export-hf`).

Reads the framework's checkpoints (any ZeRO stage, any tensor-parallel size), merges TP shards with the model's
partition rules (`hgrn_megatron.tp_rules`), strips the vocabulary padding and writes a directory that
`transformers` loads with `trust_remote_code=True`: the model files in `hf_files/` are self-contained.
"""
