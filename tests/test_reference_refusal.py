"""Only a listed refusal of the reference, raised inside peft / transformers, skips a case; every
other error fails it (a typo in the test's own config, the same words raised by test code)."""

import pytest
from conftest import KNOWN_REFUSALS, reference_or_skip
from peft import LoraConfig, PrefixTuningConfig, get_peft_model

from peftc.models import example_inputs, tiny_model

PAST_KEY_VALUES = KNOWN_REFUSALS[0].message


def test_listed_refusal_inside_peft_is_a_skip_naming_it():
    """PEFT's own refusal of prefix tuning on an encoder whose forward takes no past_key_values
    (transformers >= 5.24's BERT), reproduced on the installed BERT by hiding that argument."""
    pm = get_peft_model(tiny_model("tiny-bert"), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    pm.base_model.bert.forward = lambda input_ids=None, attention_mask=None, **kwargs: None
    with pytest.raises(pytest.skip.Exception) as e:
        reference_or_skip(pm, **example_inputs("tiny-bert"))
    assert PAST_KEY_VALUES in str(e.value) and KNOWN_REFUSALS[0].versions in str(e.value)
    assert "installed: HF PEFT" in str(e.value)


def test_unlisted_error_inside_peft_still_fails():
    with pytest.raises(ValueError, match="Target modules"):
        reference_or_skip(get_peft_model, tiny_model("tiny-llama"), LoraConfig(target_modules=["no_such_module"]))


def test_listed_words_outside_the_reference_still_fail():
    def test_code():
        raise ValueError(PAST_KEY_VALUES)  # raised here, not inside peft or transformers

    with pytest.raises(ValueError, match="past key values"):
        reference_or_skip(test_code)
