"""A reference that refuses a case skips it with the reference's error; other errors still fail."""

import pytest
from conftest import skip_when_reference_refuses
from peft import LoraConfig, get_peft_model

from peftc.models import tiny_model


def test_refusal_inside_peft_is_a_skip_naming_the_error():
    with pytest.raises(pytest.skip.Exception, match=r"refuses to build the reference: \w+Error: Target modules"):
        get_peft_model(tiny_model("tiny-llama"), LoraConfig(target_modules=["no_such_module"]))


def test_error_outside_the_reference_still_fails():
    def broken_test_code():
        return int("not a number")  # raised here, not inside peft or transformers

    with pytest.raises(ValueError, match="invalid literal"):
        skip_when_reference_refuses(broken_test_code)()
