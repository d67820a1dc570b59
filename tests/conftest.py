"""Test-session rules shared by every test file.

A reference library may refuse a case on some installed versions (HF PEFT 0.21.2 with
transformers 5.24 refuses prefix tuning on BERT: "Model does not support past key values").
Building such a reference then skips the case with the reference's own error instead of failing
it: the refusal says nothing about peftc, whose behaviour there is covered by tests with a
hand-written reference. Only building a reference from a config is covered (``get_peft_model``);
loading a checkpoint peftc wrote into PEFT is a check of peftc and still fails when PEFT refuses.
"""

import functools
from pathlib import Path

import peft
import pytest
import transformers

_REFERENCE_ROOTS = tuple(Path(m.__file__).parent for m in (peft, transformers))


def raised_inside_reference(e: BaseException) -> bool:
    """Whether the innermost frame of ``e``'s traceback is in peft's or transformers' code."""
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return last is not None and any(Path(last).is_relative_to(r) for r in _REFERENCE_ROOTS)


def skip_when_reference_refuses(build):
    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        try:
            return build(*args, **kwargs)
        except (ValueError, NotImplementedError, TypeError, AttributeError) as e:
            if not raised_inside_reference(e):
                raise
            pytest.skip(f"HF PEFT {peft.__version__} (transformers {transformers.__version__}) refuses "
                        f"to build the reference: {type(e).__name__}: {e}")

    wrapper.__wrapped_reference__ = build
    return wrapper


# conftest is imported before the test modules, so their `from peft import get_peft_model` binds this
peft.get_peft_model = skip_when_reference_refuses(peft.get_peft_model)
