"""benchmarks/quant_linear.py: the CPU format table runs on a tiny model and orders the formats by size
and error (no timings asserted)."""

from benchmarks.quant_linear import format_table, print_table


def test_format_table_on_a_tiny_model(capsys):
    rows = {r["format"]: r for r in format_table(hidden=64, layers=1, intermediate=128)}
    fp, nf4, nf4_plain, int8 = (rows[k] for k in ("fp32 (none)", "nf4 + double quant", "nf4", "int8 per channel"))
    assert nf4["weight_bytes"] < nf4_plain["weight_bytes"] < int8["weight_bytes"] < fp["weight_bytes"] / 3.5
    assert 4.12 < nf4["bits"] < 4.2 and nf4_plain["bits"] == 4.5
    assert 0 < int8["rel_err"] < nf4["rel_err"] < 0.2
    assert 0 < int8["logits_max_abs_diff"] and 0 < nf4["logits_max_abs_diff"]
    assert "| nf4 + double quant |" in print_table(list(rows.values()))
