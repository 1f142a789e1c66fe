from __future__ import annotations

from tests.examples import load_example


def test_example_flags_the_fast_qkv_run_and_qk_clip_acts(tmp_path):
    example = load_example("attention_logit_growth")
    reference = example.run("reference", 40, 0, str(tmp_path))
    fast = example.run("no remedy", 40, 0, str(tmp_path))
    clipped = example.run("qk_clip", 40, 0, str(tmp_path))
    # the same seed and data: the first step is the same; the fast qkv learning rate flags the growth
    # at the first sample past step 0 (every 10 steps), the reference run's logits stay below 100
    assert reference["losses"][0] == fast["losses"][0] == clipped["losses"][0]
    assert reference["first_flag"] is None and max(v for _, v in reference["max_logits"]) < 100
    assert fast["first_flag"] == clipped["first_flag"] is not None and fast["first_flag"] <= 31
    assert max(v for _, v in fast["max_logits"]) > 100 and fast["actions"] == 0
    # QK-clip scaled the heads after the flag: the logits it measured later are smaller than unremedied
    assert clipped["actions"] > 0
    assert clipped["max_logits"][-1][1] < fast["max_logits"][-1][1]


def test_behind_from_is_the_first_step_of_the_last_stretch_above_the_reference():
    example = load_example("attention_logit_growth")
    ref = [1.0] * 60
    ours = [1.0] * 10 + [2.0] * 10 + [1.0] * 20 + [2.0] * 20  # behind twice: only the last stretch counts
    assert example.behind_from(ours, ref) == 40 + 2  # the 20-step mean passes 1.1 two steps in
    assert example.behind_from(ref, ref) is None


def test_example_takes_a_precision_flag(tmp_path):
    example = load_example("attention_logit_growth")
    plain = example.run("no remedy", 12, 0, str(tmp_path))
    fp8 = example.run("no remedy", 12, 0, str(tmp_path), precision="fp8-emulated")
    assert plain["losses"][0] != fp8["losses"][0]  # the FP8 quantisation is in the forward
    assert abs(plain["losses"][0] - fp8["losses"][0]) < 0.05 * plain["losses"][0]
