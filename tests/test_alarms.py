"""Host-side wording of the cross-device audit: gh.Alarm, describe_outlier, gh.cross_device_alarms.

No device is needed: the inputs are the metrics a log holds, written out by hand, and
every expected text, kind and evidence value is computed here from its definition.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import optax_gradhealth as gh
from optax_gradhealth._cross_device import describe_outlier


def test_an_alarm_is_its_text_and_carries_plain_parts():
    evidence = {"device_norm": 0.0}
    alarm = gh.Alarm("device 2: zero gradient", "dead_device", [np.int64(2)], evidence)
    assert alarm == "device 2: zero gradient" and isinstance(alarm, str)
    assert alarm.kind == "dead_device"
    assert alarm.devices == (2,) and type(alarm.devices[0]) is int
    evidence["device_norm"] = 5.0  # the alarm keeps its own copy
    assert alarm.evidence == {"device_norm": 0.0}


# ----------------------------------------------------------------------------- describe_outlier


def test_a_norm_outlier_reports_its_ratio_to_the_median_of_the_others_with_every_piece_of_evidence():
    norms = np.array([1.0, 2.0, 3.0, 30.0, 4.0], np.float32)
    cosine = np.array([0.9, 0.8, 0.7, 0.1, 0.6], np.float32)
    alarm = describe_outlier(
        3,
        norms,
        cosine,
        norm_score=np.array([0, 0, 0, 8.5, 0], np.float32),
        direction_score=np.array([9, 9, 9, 1.25, 9], np.float32),
        outlier_evidence=np.array([1, 1, 1, 14.0, 1], np.float32),
    )
    # others' median: median(1, 2, 3, 4) = 2.5; 30 / 2.5 = 12
    assert alarm == "device 3: gradient norm 12x the other devices' median (score 8.5, evidence 14)"
    assert (alarm.kind, alarm.devices) == ("outlier_norm", (3,))
    assert alarm.evidence == {
        "device_norm": 30.0,
        "median_norm_others": 2.5,
        "norm_score": 8.5,
        "direction_score": 1.25,
        "cosine_to_mean": pytest.approx(0.1),
        "median_cosine_others": pytest.approx(0.75),  # median(0.9, 0.8, 0.7, 0.6)
        "cusum_evidence": 14.0,
        "norm_ratio": 12.0,
    }


def test_equal_scores_are_worded_as_a_norm_outlier_and_a_larger_direction_score_as_a_direction_one():
    norms = np.array([1.0, 1.0, 4.0], np.float32)
    common = dict(cosine_to_mean=np.array([0.5, 0.7, -0.25]), outlier_evidence=None)
    tie = describe_outlier(
        2, norms, norm_score=np.array([0.0, 0.0, 6.0]), direction_score=np.array([0.0, 0.0, 6.0]), **common
    )
    assert tie == "device 2: gradient norm 4x the other devices' median (score 6)"
    assert tie.kind == "outlier_norm"
    by_direction = describe_outlier(
        2, norms, norm_score=np.array([0.0, 0.0, 6.0]), direction_score=np.array([0.0, 0.0, 6.5]), **common
    )
    assert by_direction == (
        "device 2: gradient direction unlike the others (cosine to the mean -0.25 vs 0.60; score 6.5)"
    )
    assert by_direction.kind == "outlier_direction" and "norm_ratio" not in by_direction.evidence


def test_a_direction_outlier_without_cosines_says_so():
    alarm = describe_outlier(
        0,
        np.array([1.0, 1.0, 1.0]),
        None,
        np.array([0.5, 0.0, 0.0]),
        np.array([7.25, 0.0, 0.0]),
        np.array([13.0, 0.0, 0.0]),
    )
    assert (
        alarm == "device 0: gradient direction unlike the others (direction unlike the others; score 7.25, evidence 13)"
    )
    assert alarm.evidence == {
        "device_norm": 1.0,
        "median_norm_others": 1.0,
        "norm_score": 0.5,
        "direction_score": 7.25,
        "cusum_evidence": 13.0,
    }


def test_without_scores_the_alarm_is_a_norm_one_and_shows_only_what_it_has():
    norms = np.array([2.0, 2.0, 2.0, 0.5])
    only_evidence = describe_outlier(3, norms, None, None, None, np.array([0.0, 0.0, 0.0, 20.0]))
    assert only_evidence == "device 3: gradient norm 0.25x the other devices' median (evidence 20)"
    assert only_evidence.evidence == {
        "device_norm": 0.5,
        "median_norm_others": 2.0,
        "cusum_evidence": 20.0,
        "norm_ratio": 0.25,
    }
    # One score without the other is not a comparison: neither is reported.
    one_score = describe_outlier(3, norms, None, np.array([0.0, 0.0, 0.0, 9.0]), None, None)
    assert one_score == "device 3: gradient norm 0.25x the other devices' median"
    assert set(one_score.evidence) == {"device_norm", "median_norm_others", "norm_ratio"}


def test_the_median_of_the_others_skips_their_nonfinite_norms():
    alarm = describe_outlier(2, np.array([np.nan, 1.0, 3.0, 0.5, np.inf]), None, None, None, None)
    assert alarm.evidence["median_norm_others"] == 0.75  # median(1.0, 0.5)
    assert alarm == "device 2: gradient norm 4x the other devices' median"


def test_the_evidence_is_computed_in_float64_from_float32_logs():
    # median(1, 1 + 2**-23) = 1 + 2**-24 exactly in float64; float32 rounds it to 1.
    norms = np.array([1.0, 1.0 + 2.0**-23, 5.0], np.float32)
    cosine = np.array([0.5, 0.5 + 2.0**-24, 0.0], np.float32)  # 2**-24: one float32 step at 0.5
    alarm = describe_outlier(2, norms, cosine, None, None, None)
    assert alarm.evidence["median_norm_others"] == 1.0 + 2.0**-24
    assert alarm.evidence["norm_ratio"] == 5.0 / (1.0 + 2.0**-24)
    assert alarm.evidence["median_cosine_others"] == 0.5 + 2.0**-25


@pytest.mark.parametrize("others", [[0.0, 0.0], [np.nan, np.inf]], ids=["all-zero", "all-nonfinite"])
def test_a_ratio_to_a_median_of_zero_or_of_nothing_is_infinite(others):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warning about an empty median
        alarm = describe_outlier(0, np.array([3.0, *others]), None, None, None, None)
    assert alarm == "device 0: gradient norm infx the other devices' median"
    assert alarm.evidence["norm_ratio"] == math.inf
    typical = alarm.evidence["median_norm_others"]
    assert typical == 0.0 if others[0] == 0.0 else math.isnan(typical)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nonfinite_device_is_worded_before_its_scores(bad):
    alarm = describe_outlier(
        1, np.array([1.0, bad, 2.0]), None, np.array([0.0, np.inf, 0.0]), np.array([0.0, 0.0, 0.0]), None
    )
    assert alarm == "device 1: non-finite gradient (NaN/Inf)"
    assert (alarm.kind, alarm.devices) == ("nonfinite_device", (1,))
    assert alarm.evidence["median_norm_others"] == 1.5 and alarm.evidence["norm_score"] == math.inf


def test_a_dead_device_is_worded_whatever_its_scores():
    alarm = describe_outlier(
        1, np.array([1.0, 0.0, 2.0]), None, np.array([0.0, 0.0, 0.0]), np.array([0.0, 30.0, 0.0]), None
    )
    assert alarm == "device 1: zero gradient (dead device or empty batch)"
    assert (alarm.kind, alarm.devices) == ("dead_device", (1,))


# ----------------------------------------------------------------------------- cross_device_alarms


def _clean(k):
    return {
        "xdev/device_norms": np.ones(k, np.float32),
        "xdev/duplicate_pairs": np.zeros((k, k), bool),
        "xdev/param_desync": np.zeros(k, bool),
    }


def test_a_clean_audit_raises_nothing():
    assert gh.cross_device_alarms(_clean(4)) == []
    assert gh.cross_device_alarms({}) == []


def _every_metric(k=4):
    """A log row holding every metric the alarms read: device 1 a norm outlier, devices
    2 and 3 a near-duplicate pair, device 0 out of sync."""
    cos = np.full((k, k), 0.2, np.float32)
    np.fill_diagonal(cos, 1.0)
    cos[2, 3] = cos[3, 2] = 0.95
    near = np.zeros((k, k), bool)
    near[2, 3] = near[3, 2] = True
    return _clean(k) | {
        "xdev/device_norms": np.array([1.0, 5.0, 1.0, 1.0], np.float32),
        "xdev/outlier_devices": np.array([False, True, False, False]),
        "xdev/outlier_device": np.int32(1),
        "xdev/outlier_score": np.float32(11.0),
        "xdev/cosine_to_mean": np.array([0.9, 0.3, 0.8, 0.7], np.float32),
        "xdev/norm_score": np.array([0.0, 11.0, 0.0, 0.0], np.float32),
        "xdev/direction_score": np.array([0.0, 2.0, 0.0, 0.0], np.float32),
        "xdev/outlier_evidence": np.array([0.0, 15.0, 0.0, 0.0], np.float32),
        "xdev/pairwise_cosine": cos,
        "xdev/near_duplicate_pairs": near,
        "xdev/param_desync": np.array([True, False, False, False]),
    }


def _differs(v):
    return np.logical_not(v) if v.dtype == bool else v * 2 + 1


def _alarm_parts(alarms):
    return [(str(a), a.kind, a.devices, a.evidence) for a in alarms]


def test_per_device_copies_are_read_from_the_first_copy():
    """pmap leaves a leading device axis on every metric: the first copy is the one read
    (the second copy of every metric differs here, so a read of any other is seen)."""
    first = _every_metric()
    expected = gh.cross_device_alarms(first)
    assert _alarm_parts(expected) == [
        (
            "device 1: gradient norm 5x the other devices' median (score 11, evidence 15)",
            "outlier_norm",
            (1,),
            {
                "device_norm": 5.0,
                "median_norm_others": 1.0,
                "norm_score": 11.0,
                "direction_score": 2.0,
                "cosine_to_mean": pytest.approx(0.3),
                "median_cosine_others": pytest.approx(0.8),
                "cusum_evidence": 15.0,
                "norm_ratio": 5.0,
            },
        ),
        (
            "devices 2 and 3 have nearly the same gradients (pair cosine 0.95 vs median 0.20; same examples?)",
            "near_duplicate_pair",
            (2, 3),
            {"pair_cosine": pytest.approx(0.95), "median_pair_cosine": pytest.approx(0.2)},
        ),
        ("device 0 parameters differ from the majority (desync or corruption)", "param_desync", (0,), {}),
    ]
    copies = {name: np.stack([v, _differs(v)]) for name, v in first.items()}
    assert _alarm_parts(gh.cross_device_alarms(copies)) == _alarm_parts(expected)
    # a deeper leading shape (e.g. steps x devices) is read at its first index too
    deeper = {name: np.stack([v, _differs(v)]) for name, v in copies.items()}
    assert _alarm_parts(gh.cross_device_alarms(deeper)) == _alarm_parts(expected)
    # the older log's single device and score, without the norms, the same way
    older = {"xdev/outlier_device": np.int32(1), "xdev/outlier_score": np.float32(11.0)}
    older_copies = {name: np.stack([v, _differs(v)]) for name, v in older.items()}
    assert gh.cross_device_alarms(older_copies) == ["device 1: outlier (score 11)"]


def test_several_named_devices_without_the_norms_are_each_worded_from_the_score():
    m = {"xdev/outlier_devices": np.array([False, True, False, True]), "xdev/outlier_score": np.float32(30.0)}
    assert gh.cross_device_alarms(m) == ["device 1: outlier (score 30)", "device 3: outlier (score 30)"]


def test_an_exact_duplicate_pair_is_not_named_again_as_a_near_one():
    m = _every_metric()
    m["xdev/duplicate_pairs"] = m["xdev/near_duplicate_pairs"].copy()
    kinds = [(a.kind, a.devices) for a in gh.cross_device_alarms(m)]
    assert kinds == [("outlier_norm", (1,)), ("duplicate_pair", (2, 3)), ("param_desync", (0,))]


def test_logs_without_the_named_devices_fall_back_to_the_single_outlier_device():
    m = _clean(4) | {"xdev/outlier_device": np.int32(2), "xdev/outlier_score": np.float32(12.5)}
    m["xdev/device_norms"] = np.array([1.0, 1.0, 0.25, 1.0], np.float32)
    [alarm] = gh.cross_device_alarms(m)
    assert alarm == "device 2: gradient norm 0.25x the other devices' median"
    assert alarm.devices == (2,)
    assert gh.cross_device_alarms(m | {"xdev/outlier_device": np.int32(-1)}) == []
    assert gh.cross_device_alarms(m | {"xdev/outlier_device": np.int32(0)})[0].devices == (0,)
    # The named-devices vector wins over the single device when both are logged.
    named = m | {"xdev/outlier_devices": np.array([False, True, False, True])}
    assert [a.devices for a in gh.cross_device_alarms(named)] == [(1,), (3,)]


def test_a_log_row_whose_single_outlier_device_is_nan_raises_nothing():
    """A row where the older single-device field was not logged (NaN, as a log reads a
    missing value back) names no device, as -1 does."""
    m = _clean(4) | {"xdev/outlier_device": np.float32(np.nan), "xdev/outlier_score": np.float32(np.nan)}
    assert gh.cross_device_alarms(m) == []
    assert gh.cross_device_alarms(m | {"xdev/outlier_device": np.float64(np.inf)}) == []
    assert gh.cross_device_alarms(m | {"xdev/outlier_device": np.float32(2.0)})[0].devices == (2,)


def test_every_device_out_of_sync_is_one_alarm_that_there_is_no_majority():
    m = _clean(2) | {"xdev/param_desync": np.array([True, True])}
    [alarm] = gh.cross_device_alarms(m)
    assert alarm == "parameter replicas disagree with no majority (all 2 devices; desync or corruption)"
    assert (alarm.kind, alarm.devices, alarm.evidence) == ("param_desync", (0, 1), {})
    # from a log: 0/1 floats
    [alarm] = gh.cross_device_alarms(_clean(4) | {"xdev/param_desync": np.ones(4)})
    assert alarm.devices == (0, 1, 2, 3)


def test_an_outlier_without_the_norms_is_worded_from_its_score():
    m = {"xdev/outlier_device": np.int32(3), "xdev/outlier_score": np.float32(12.5)}
    [alarm] = gh.cross_device_alarms(m)
    assert alarm == "device 3: outlier (score 12.5)"
    assert (alarm.kind, alarm.devices, alarm.evidence) == ("outlier_norm", (3,), {})


def test_every_named_device_gets_its_evidence_from_the_logged_vectors():
    m = _clean(4) | {
        "xdev/device_norms": np.array([1.0, 1.0, 8.0, 1.0], np.float32),
        "xdev/outlier_devices": np.array([False, False, True, False]),
        "xdev/cosine_to_mean": np.array([0.9, 0.8, 0.1, 0.7], np.float32),
        "xdev/norm_score": np.array([0.0, 0.0, 20.0, 0.0], np.float32),
        "xdev/direction_score": np.array([0.0, 0.0, 3.0, 0.0], np.float32),
        "xdev/outlier_evidence": np.array([0.0, 0.0, 18.0, 0.0], np.float32),
    }
    [alarm] = gh.cross_device_alarms(m)
    assert alarm == "device 2: gradient norm 8x the other devices' median (score 20, evidence 18)"
    assert alarm.evidence["cosine_to_mean"] == pytest.approx(0.1)
    assert alarm.evidence["median_cosine_others"] == pytest.approx(0.8)


def test_duplicate_pairs_are_named_once_each_in_order():
    m = _clean(8)
    for j, k in [(2, 6), (0, 5)]:
        m["xdev/duplicate_pairs"][j, k] = m["xdev/duplicate_pairs"][k, j] = True
    alarms = gh.cross_device_alarms(m)
    assert alarms == [
        "devices 0 and 5 have identical gradients (same data shard?)",
        "devices 2 and 6 have identical gradients (same data shard?)",
    ]
    assert [(a.kind, a.devices, a.evidence) for a in alarms] == [
        ("duplicate_pair", (0, 5), {}),
        ("duplicate_pair", (2, 6), {}),
    ]
    assert all(type(d) is int for a in alarms for d in a.devices)


def test_a_near_duplicate_pair_reports_its_cosine_against_the_median_of_the_other_pairs():
    k = 4
    cos = np.array(
        [
            [1.0, 0.1, 0.2, 0.3],
            [0.1, 1.0, 0.4, 0.9],
            [0.2, 0.4, 1.0, 0.6],
            [0.3, 0.9, 0.6, 1.0],
        ],
        np.float32,
    )
    near = np.zeros((k, k), bool)
    near[1, 3] = near[3, 1] = True
    m = _clean(k) | {"xdev/near_duplicate_pairs": near, "xdev/pairwise_cosine": cos}
    [alarm] = gh.cross_device_alarms(m)
    # other pairs (both triangles, diagonal and the pair left out): 0.1 0.2 0.3 0.4 0.6, twice
    assert alarm == ("devices 1 and 3 have nearly the same gradients (pair cosine 0.90 vs median 0.30; same examples?)")
    assert (alarm.kind, alarm.devices) == ("near_duplicate_pair", (1, 3))
    assert alarm.evidence == {"pair_cosine": pytest.approx(0.9), "median_pair_cosine": pytest.approx(0.3)}
    # Without the cosines the pair is still named, without numbers.
    del m["xdev/pairwise_cosine"]
    [bare] = gh.cross_device_alarms(m)
    assert bare == "devices 1 and 3 have nearly the same gradients (same examples?)"
    assert (bare.kind, bare.devices, bare.evidence) == ("near_duplicate_pair", (1, 3), {})
    # Without the exact-duplicate matrix in the log, the near pair is still named.
    del m["xdev/duplicate_pairs"]
    assert gh.cross_device_alarms(m) == [bare]


def test_desynchronised_devices_are_named_each_and_every_kind_comes_in_a_fixed_order():
    m = _clean(4) | {
        "xdev/outlier_devices": np.array([True, False, False, False]),
        "xdev/near_duplicate_pairs": np.zeros((4, 4), bool),
    }
    m["xdev/device_norms"] = np.array([0.0, 1.0, 1.0, 1.0], np.float32)
    m["xdev/param_desync"] = np.array([False, True, False, True])
    m["xdev/duplicate_pairs"][2, 3] = m["xdev/duplicate_pairs"][3, 2] = True
    m["xdev/near_duplicate_pairs"][0, 1] = m["xdev/near_duplicate_pairs"][1, 0] = True
    alarms = gh.cross_device_alarms(m)
    assert [(a.kind, a.devices) for a in alarms] == [
        ("dead_device", (0,)),
        ("duplicate_pair", (2, 3)),
        ("near_duplicate_pair", (0, 1)),
        ("param_desync", (1,)),
        ("param_desync", (3,)),
    ]
    assert alarms[3] == "device 1 parameters differ from the majority (desync or corruption)"
    assert alarms[3].evidence == {} and type(alarms[3].devices[0]) is int
