"""hgrn_megatron: the HGRN model on megatron-core, and the import root of the project.

Layers, imports pointing down only (kernels -> core -> tokenizer -> pretrain -> export -> evaluation; checked by
tests/architecture/test_import_graph.py, see docs/ARCHITECTURE.md):
- `hgrn_megatron.kernels`   (folder `kernels/`): the scan math; imports nothing from the project.
- core, this folder: the HGRU token mixer, layer specs, presets, FLOP model, config base; `corpus/` reads shards.
- `hgrn_megatron.tokenizer` (folder `tokenizer/`): SentencePiece training and loading.
- `hgrn_megatron.pretrain`  (folder `pretrain/`): data pipeline, engine, checkpoints, loop, logging.
- `hgrn_megatron.export`: Hugging Face export (reads pretrain's checkpoints).
"""

__version__ = "0.1.0"
