"""The token mixers a model can use: name -> `MixerSpec` (`ModelConfig.mixer` is a key of `MIXERS`).

Each mixer describes itself in its own module (layer spec, parameter and FLOP formulas, TP rules, how document
starts reach it, its position embedding); the model, the FLOP model, the TP table, the exporter and the
`hgrn-model` command ask this registry rather than testing names. A new mixer is its module plus a line here.
"""
from __future__ import annotations

from hgrn_megatron.mixers.attention import ATTENTION
from hgrn_megatron.mixers.base import MixerSpec
from hgrn_megatron.mixers.hgrn import HGRN

MIXERS: dict[str, MixerSpec] = {
    "hgrn": HGRN,
    "attention": ATTENTION,
}


def registered_mixers() -> str:
    """The registered names, for messages and help texts: "hgrn, attention"."""
    return ", ".join(MIXERS)


def get_mixer(name: str) -> MixerSpec:
    """The description of mixer `name`; KeyError naming the registered mixers."""
    try:
        return MIXERS[name]
    except KeyError:
        raise KeyError(f"unknown mixer {name!r}; choose one of: {registered_mixers()}") from None


__all__ = ["MIXERS", "MixerSpec", "get_mixer", "registered_mixers"]
