"""AdamW groups: weight decay on weight matrices only — never on norms, biases, θ or the lower-bound table."""
import pytest

from hgrn_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed


def _group_names():
    from megatron.core import parallel_state

    from hgrn_megatron.config import ModelConfig
    from hgrn_megatron.model import build_model
    from hgrn_megatron.pretrain.engine import param_groups

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    model = build_model(ModelConfig(preset="tiny", add_bias_linear=True), 256)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, weight_decay=0.1)
    return {g["name"]: (g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups}


def test_no_decay_on_norms_biases_theta_and_lower_bounds():
    groups = run_distributed(_group_names, world_size=1, timeout=120)[0]
    decay_wd, decay = groups["decay"]
    no_decay_wd, no_decay = groups["no_decay"]
    assert decay_wd == 0.1 and no_decay_wd == 0.0
    assert "lower_bounds.table" in no_decay
    assert "decoder.layers.0.self_attention.theta" in no_decay
    assert "decoder.layers.0.self_attention.norm.weight" in no_decay
    assert "decoder.layers.0.input_layernorm.weight" in no_decay and "decoder.final_layernorm.weight" in no_decay
    assert "decoder.layers.0.self_attention.linear_in.bias" in no_decay
    assert all(name.endswith(".weight") and "norm" not in name for name in decay)
    assert "decoder.layers.0.self_attention.linear_in.weight" in decay and "embedding.word_embeddings.weight" in decay
