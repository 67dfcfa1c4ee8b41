"""hgrn_megatron: the HGRN model on megatron-core, and the import root of the project.

Layout (imports flow one way: kernels -> hgrn_megatron model -> pretrain):
- `hgrn_megatron.kernels`   (folder `kernels/`): the scan math; imports nothing from the project.
- `hgrn_megatron` (this folder): the HGRU token mixer, layer specs, presets, FLOP model.
- `hgrn_megatron.tokenizer` (folder `tokenizer/`): SentencePiece training and loading.
- `hgrn_megatron.pretrain`  (folder `pretrain/`): data pipeline, engine, checkpoints, loop, logging.
- `hgrn_megatron.export`: Hugging Face export.
"""

__version__ = "0.1.0"
