"""hgrn_megatron.pretrain: data pipeline, DeepSpeed engine, sharded checkpoints, training loop, logging.

May import `hgrn_megatron` (model), `hgrn_megatron.kernels` and `hgrn_megatron.tokenizer`; nothing imports it back.
"""
