"""`leapllm bench compression`: the variants, their shared build steps, ratios and the table."""

from __future__ import annotations

import pytest

from leapllm.benchmarking import compression_table as ct
from leapllm.errors import InvalidRequestError
from tests.cli_helpers import assert_one_line_error


def test_every_variant_the_issue_asks_for_is_in_the_table():
    names = [v.name for v in ct.variants(None)]
    for name in ("float32", "bfloat16", "int8", "int4-rtn", "int4-awq", "magnitude-0.5", "wanda-0.5", "2:4",
                 "heads-0.33", "ffn-0.5", "ffn-0.5+distill"):
        assert name in names
    assert len(set(names)) == len(names)


def test_variants_that_start_the_same_way_share_their_build_folders(tmp_path):
    by_name = {v.name: v for v in ct.variants(100)}
    pruned, distilled = by_name["ffn-0.5"], by_name["ffn-0.5+distill"]
    assert ct.step_folder(tmp_path, pruned.steps) == ct.step_folder(tmp_path, distilled.steps[:1])
    assert ct.step_folder(tmp_path, distilled.steps) != ct.step_folder(tmp_path, pruned.steps)
    assert ("--steps", "100") == tuple(distilled.steps[1][-2:])


def test_a_measured_folder_stays_while_a_later_variant_builds_on_it(tmp_path):
    by_name = {v.name: v for v in ct.variants(None)}
    folder = ct.step_folder(tmp_path, by_name["ffn-0.5"].steps)
    folder.mkdir()
    ct.remove_unneeded(folder, [by_name["ffn-0.5+distill"]], tmp_path)
    assert folder.exists()
    ct.remove_unneeded(folder, [by_name["int8"]], tmp_path)
    assert not folder.exists()


def test_ratios_are_to_float32_and_failed_rows_show_their_error():
    rows = [{"name": "float32", "description": "f", "status": "ok", "size_mib": 500.0, "peak_rss_mib": 800.0,
             "decode_tok_s": 20.0, "perplexity": 10.0},
            {"name": "int4-rtn", "description": "q", "status": "ok", "size_mib": 125.0, "peak_rss_mib": 400.0,
             "decode_tok_s": 80.0, "perplexity": 10.5},
            {"name": "2:4", "description": "s", "status": "failed", "error": "prune exited with 2"}]
    ct.add_ratios(rows)
    assert rows[1]["size_x"] == 0.25 and rows[1]["decode_x"] == 4.0
    assert rows[1]["perplexity_change"] == pytest.approx(0.05)
    table = ct.markdown({"rows": rows, "eval_tokens": 6000, "eval_text": ct.EVAL_TEXT, "decode_tokens": 64,
                         "repeats": 3, "calibration_text": ct.CALIB_TEXT, "cpu_count": 2, "command": None})
    assert "| int4-rtn | q | 125 | 0.25 | 400 | 0.50 | 80.0 | 4.00 | 10.500 | +5.0% |" in table
    assert "failed: prune exited with 2" in table


def test_bad_settings_are_refused_before_anything_runs(capsys):
    with pytest.raises(InvalidRequestError, match="unknown variant"):
        ct.TableSettings(only=["int3"]).validate()
    assert_one_line_error(capsys, ["bench", "compression", "--eval-tokens", "10"], "--eval-tokens")
    assert_one_line_error(capsys, ["bench", "compression", "--distill-steps", "0"], "--distill-steps")
