"""Test-session rules shared by every test file: the known refusals of the reference library.

A reference library may refuse a case on some installed versions (HF PEFT 0.21.2 with
transformers >= 5.24 refuses prefix tuning on BERT). A test that builds or runs a PEFT reference
where such a refusal is possible does so through ``reference_or_skip`` (or inside
``with reference_refusals():``): the case skips when, and only when, the error is one listed in
``KNOWN_REFUSALS`` (its type, its message, raised inside peft's or transformers' own code), with
the refusal and the versions in the reason. Any other error fails the test, a typo in the test's
own config included. Nothing is patched globally: a test that does not ask for this fails on every
error. With the versions in constraints.txt nothing skips.

    >>> pm = reference_or_skip(get_peft_model, base, PrefixTuningConfig(task_type="SEQ_CLS"))
    >>> ref = reference_or_skip(pm, input_ids=ids).logits
"""

import contextlib
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import transformers

__all__ = ["KNOWN_REFUSALS", "KnownRefusal", "known_refusal", "raised_inside_reference", "reference_or_skip",
           "reference_refusals"]

_REFERENCE_ROOTS = tuple(Path(m.__file__).parent for m in (peft, transformers))


@dataclass(frozen=True)
class KnownRefusal:
    """One upstream refusal: the exception type, a substring of its message (the library's exact
    words), where it is known to happen and why it says nothing about peftc."""

    error: type[BaseException]
    message: str
    versions: str
    case: str


KNOWN_REFUSALS = (
    KnownRefusal(ValueError, "Model does not support past key values which are required for prefix tuning.",
                 "HF PEFT 0.21.2 with transformers >= 5.24",
                 "prefix tuning on BERT: the encoder's forward no longer takes past_key_values "
                 "(raised by PeftModelForSequenceClassification.forward; peftc is checked there against "
                 "test_prefix.py's hand-written reference)"),
)


def raised_inside_reference(e: BaseException) -> bool:
    """Whether the innermost frame of ``e``'s traceback is in peft's or transformers' code."""
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return last is not None and any(Path(last).is_relative_to(r) for r in _REFERENCE_ROOTS)


def known_refusal(e: BaseException) -> KnownRefusal | None:
    """The entry of ``KNOWN_REFUSALS`` that ``e`` is (type, message and raising frame), else None."""
    if not raised_inside_reference(e):
        return None
    return next((r for r in KNOWN_REFUSALS if isinstance(e, r.error) and r.message in str(e)), None)


@contextlib.contextmanager
def reference_refusals():
    """Skip the test if the block raises a known refusal of the reference; re-raise anything else."""
    try:
        yield
    except Exception as e:  # re-raised unless it is listed
        refusal = known_refusal(e)
        if refusal is None:
            raise
        pytest.skip(f"known refusal of the reference ({refusal.versions}; installed: HF PEFT {peft.__version__}, "
                    f"transformers {transformers.__version__}): {refusal.case}: {type(e).__name__}: {e}")


def reference_or_skip(build, *args, **kwargs):
    """``build(*args, **kwargs)`` (a PEFT reference built or run), skipping on a known refusal."""
    with reference_refusals():
        return build(*args, **kwargs)
