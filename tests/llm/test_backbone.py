import pytest

from userllm.errors import InputError
from userllm.llm.backbone import decoder_layers, load_backbone


def test_decoder_layers_found_by_model_type(tiny_lm):
    layers = decoder_layers(tiny_lm)
    assert len(layers) == 4


def test_unknown_model_names_the_override(tiny_lm):
    tiny_lm.config.model_type = "mystery"
    with pytest.raises(InputError, match="decoder_layers_path"):
        decoder_layers(tiny_lm)
    path = "model.layers" if hasattr(tiny_lm, "model") else "transformer.h"
    assert len(decoder_layers(tiny_lm, override=path)) == 4
    with pytest.raises(InputError, match="no attribute path"):
        decoder_layers(tiny_lm, override="model.nope")


def test_load_local_directory(tiny_lm_dir):
    bb = load_backbone(str(tiny_lm_dir))
    ids = bb.tokenizer("w3 w4 w5", return_tensors="pt").input_ids
    assert ids.shape == (1, 3)
    assert bb.model(ids).logits.shape == (1, 3, 96) and not bb.model.training


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_backbone(str(tmp_path / "nope"))
