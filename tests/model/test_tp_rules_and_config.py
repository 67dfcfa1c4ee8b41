"""The TP partition table (against megatron's own weight splitting) and the model config's checks."""
import pytest
import torch

from hgrn_megatron.config import ModelConfig
from hgrn_megatron.config_base import ConfigError
from hgrn_megatron.tp_rules import (
    COLUMN_GLU,
    ROW,
    merge_state_dicts,
    merge_tensors,
    rule_for,
    split_state_dict,
    split_tensor,
)


@pytest.mark.parametrize("tp", [2, 4])
def test_glu_and_row_splits_match_megatron_cpu_initialisation(tp):
    """megatron builds the full matrix and hands rank r its blocks; our table must give the same blocks."""
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    def init(t):
        torch.manual_seed(5)
        return torch.nn.init.normal_(t)

    for rule, (out_features, in_features), stride, dim in [(COLUMN_GLU, (16, 4), 2, 0), (ROW, (4, 16), 1, 1)]:
        master = init(torch.empty(out_features, in_features))
        for rank in range(tp):
            local_shape = (out_features // tp, in_features) if dim == 0 else (out_features, in_features // tp)
            local = torch.empty(local_shape)
            _initialize_affine_weight_cpu(
                local, out_features, in_features, local_shape[dim], dim, init, stride=stride,
                rank=rank, world_size=tp, skip_set_tensor_parallel_attributes=True,
            )
            assert torch.equal(split_tensor(master, rule, tp, rank), local)


def test_split_then_merge_is_identity_for_every_rule():
    full = {
        "embedding.word_embeddings.weight": torch.randn(8, 4),
        "lower_bounds.table": torch.randn(3, 4),
        "decoder.layers.0.self_attention.linear_in.weight": torch.randn(8, 4),
        "decoder.layers.0.self_attention.theta": torch.randn(4),
        "decoder.layers.0.self_attention.linear_out.weight": torch.randn(4, 8),
        "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(8, 4),
        "decoder.layers.0.mlp.linear_fc2.weight": torch.randn(4, 4),
        "decoder.layers.0.input_layernorm.weight": torch.randn(4),
        "decoder.layers.0.mlp.linear_fc1._extra_state": None,
    }
    shards = [split_state_dict(full, 2, r) for r in range(2)]
    assert shards[0]["lower_bounds.table"].shape == (3, 2)  # split along channels, not layers
    assert shards[1]["decoder.layers.0.self_attention.linear_out.weight"].shape == (4, 4)
    norm = "decoder.layers.0.input_layernorm.weight"
    assert torch.equal(shards[0][norm], full[norm])
    merged = merge_state_dicts(shards)
    assert merged.keys() == full.keys()
    assert all(v is None if full[k] is None else torch.equal(v, full[k]) for k, v in merged.items())


def test_partition_table_errors_name_the_parameter():
    with pytest.raises(KeyError, match="decoder.layers.0.self_attention.mystery"):
        rule_for("decoder.layers.0.self_attention.mystery")
    with pytest.raises(ValueError, match="linear_in.weight.*not divisible"):
        split_state_dict({"decoder.layers.0.self_attention.linear_in.weight": torch.zeros(6, 2)}, 4, 0)
    name = "decoder.final_layernorm.weight"
    with pytest.raises(ValueError, match=f"replicated '{name}' differs"):
        merge_tensors([torch.zeros(3), torch.ones(3)], rule_for(name), name)
    with pytest.raises(ValueError, match="different keys"):
        merge_state_dicts([{name: torch.zeros(3)}, {}])


def test_preset_fills_fields_and_explicit_fields_win():
    cfg = ModelConfig.build({"preset": "hgrn-1b", "mixer": "attention", "seq_length": 4096})
    assert (cfg.hidden_size, cfg.num_layers, cfg.ffn_hidden_size) == (2048, 16, 4096)
    assert cfg.mixer == "attention" and cfg.seq_length == 4096 and cfg.preset == "hgrn-1b"
    assert ModelConfig().hidden_size == ModelConfig.build({"preset": "tiny"}).hidden_size  # defaults = tiny


@pytest.mark.parametrize("fields, message", [
    ({"preset": "hgrn-2b"}, "unknown preset 'hgrn-2b'; choose one of: tiny"),
    ({"variant": "complex", "expand_ratio": 2}, "expand_ratio=2 applies to the real variant only"),
    ({"hidden_size": 64, "num_attention_heads": 5}, "not divisible by num_attention_heads"),
    ({"mixer_norm": "batchnorm"}, "model.mixer_norm"),
    ({"hiden_size": 64}, "did you mean 'hidden_size'"),
])
def test_bad_model_configs_are_named(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.build(fields, where="model")


def test_validate_parallel_names_every_field_that_does_not_split():
    cfg = ModelConfig(hidden_size=96, num_attention_heads=6, ffn_hidden_size=102)
    cfg.validate_parallel(2)
    with pytest.raises(ConfigError) as err:
        cfg.validate_parallel(4)
    lines = str(err.value).splitlines()
    assert lines == [
        "model.num_attention_heads: 6 is not divisible by the tensor-parallel size 4",
        "model.ffn_hidden_size: 102 is not divisible by the tensor-parallel size 4",
    ]
